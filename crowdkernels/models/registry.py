"""The models by name (as timm's ``models/_registry.py``): each model class registers the names it is built
under with :func:`register_model`; :func:`build_model` builds one from a name and its constructor's arguments
(a run's ``model`` and ``model_kwargs``, a checkpoint's ``model_name`` and ``config["model_kwargs"]``)."""
from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["MODEL_BUILDERS", "register_model", "build_model", "model_names"]

#: name -> constructor(**model_kwargs) of every registered model. A new architecture is one more
#: ``@register_model`` on its class.
MODEL_BUILDERS: dict[str, Callable[..., nn.Module]] = {}

# name -> where model_names() lists it
_RANKS: dict[str, int] = {}


def register_model(name: str, *, rank: int, **fixed) -> Callable[[type], type]:
    """A class decorator: ``@register_model("hmode", rank=0, variant="paper")`` makes ``build_model("hmode",
    **kw)`` build ``cls(variant="paper", **kw)`` (a name may fix some of the constructor's arguments, and one
    class may be registered under several names). ``rank``: where :func:`model_names` lists the name,
    lowest first (the command line's ``--model`` choices)."""

    def register(cls: type) -> type:
        if name in MODEL_BUILDERS:
            raise ValueError(f"model {name!r} is registered twice")

        def build(**model_kwargs) -> nn.Module:
            return cls(**fixed, **model_kwargs)

        MODEL_BUILDERS[name] = build
        _RANKS[name] = rank
        return cls

    return register


def build_model(name: str, **model_kwargs) -> nn.Module:
    """The model registered as ``name``, built with ``model_kwargs``; ValueError naming the known models when
    there is none."""
    if name not in MODEL_BUILDERS:
        raise ValueError(f"model must be one of {sorted(MODEL_BUILDERS)}, got {name!r}")
    return MODEL_BUILDERS[name](**model_kwargs)


def model_names() -> tuple[str, ...]:
    """The registered names, by rank."""
    return tuple(sorted(MODEL_BUILDERS, key=lambda name: _RANKS.get(name, len(_RANKS))))
