"""What a model expects of its input and what its output means, declared once per model (as timm's
``default_cfg``, which timm's ``data/config.py`` reads the mean and std from) and read by everything that feeds
a model: training, evaluation, :class:`crowdkernels.Counter`.

A model of output stride s maps an H x W image, RGB in [0, 1] normalized with ``input_norm``, to a map of
ceil(H/s) x ceil(W/s) cells; each cell holds the people in its s x s block of pixels times ``density_scale``.
Two multiples pad the image with zeros at the bottom/right, and they are different things:

- ``input_multiple``: what the *caller* pads to before the forward (whole-image evaluation and inference,
  :func:`crowdkernels.engine.predict.predict_density`; tiles are cut on it, so it is a multiple of s). The
  zeros reach the convolutions near the border, so it is part of what the model's validation saw.
- ``forward_multiple``: what ``forward`` pads to *itself*, whatever it is given, because its layers need it
  (pooling to stride 8: 8; L2SM's K x K regions of the stride-8 features on the stride-4 grid: 8K). The
  ground truth a model fits statistics to (L2SM's density levels) is made on that padded canvas.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

from torch import nn

from .._constants import IMAGENET_NORM

__all__ = ["Conventions", "DensityModel", "conventions_of"]


@dataclass(frozen=True)
class Conventions:
    """A model's conventions (see the module docstring).

    input_norm: ``{"mean": (r, g, b), "std": (r, g, b)}``: the input is (RGB - mean) / std per channel; None:
        raw RGB in [0, 1]. Default: ImageNet's (the pretrained VGG16 encoders').
    density_scale: the output is people per cell times this (the ground truth's scale in training: 100 for
        the released HMoDE, its LOG_PARA).
    stride: s, the output stride (None: not declared; the map's size gives it).
    input_multiple: the multiple every image is zero-padded to before the forward (evaluation, inference).
    forward_multiple: the multiple ``forward`` zero-pads its input to itself (1: none).
    """

    input_norm: dict | None = field(default_factory=lambda: dict(IMAGENET_NORM))
    density_scale: float = 1.0
    stride: int | None = None
    input_multiple: int = 16
    forward_multiple: int = 1


_FIELDS = tuple(f.name for f in fields(Conventions))


class DensityModel(nn.Module):
    """The base of the models here. ``forward(images [B, 3, H, W])`` returns an output with ``.final``
    [B, 1, ceil(H/s), ceil(W/s)]; ``criterion(**options)`` returns the training loss, an nn.Module called as
    ``criterion(output, {"density": [B, 1, H, W], "points": [[N_i, 2]]})`` -> ``{"total": loss, ...}``;
    ``conventions`` declares the rest: a class attribute, or set in ``__init__`` where the constructor's
    arguments decide it (HMoDE's variant, L2SM's K).

    The attributes below read ``conventions``. A run sets ``input_norm`` and ``density_scale`` from its
    settings (training) or from its checkpoint (loading), which replaces them in ``conventions``."""

    conventions: Conventions = Conventions()

    @property
    def stride(self) -> int | None:
        return self.conventions.stride

    @property
    def input_multiple(self) -> int:
        return self.conventions.input_multiple

    @property
    def forward_multiple(self) -> int:
        return self.conventions.forward_multiple

    @property
    def input_norm(self) -> dict | None:
        return self.conventions.input_norm

    @input_norm.setter
    def input_norm(self, norm: dict | None) -> None:
        self.conventions = replace(self.conventions, input_norm=norm)

    @property
    def density_scale(self) -> float:
        return self.conventions.density_scale

    @density_scale.setter
    def density_scale(self, scale: float) -> None:
        self.conventions = replace(self.conventions, density_scale=float(scale))


def conventions_of(model) -> Conventions:
    """``model``'s conventions: those a :class:`DensityModel` declares; for any other module whose forward
    returns ``.final`` (a user's, a test's), the ones it has as attributes (``input_norm``, ``density_scale``,
    ``stride``, ``input_multiple``, ``forward_multiple``) and the defaults of :class:`Conventions` for the rest."""
    if isinstance(model, DensityModel):
        return model.conventions
    return Conventions(**{name: getattr(model, name) for name in _FIELDS if hasattr(model, name)})
