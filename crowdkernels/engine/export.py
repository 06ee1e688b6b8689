"""A trained counter as one portable file: ONNX (run by ONNX Runtime) or a ``torch.export`` program (.pt2).

The exported graph is the whole counter, not just the network: it takes ``images`` float32 [N, 3, H, W],
RGB in [0, 1], H and W dynamic, and returns ``cells`` float32 [N, 1, ceil(H/s), ceil(W/s)], people per
output cell of stride s (their sum is the count). Inside the graph, as :func:`crowdkernels.engine.predict.predict_density`
feeds the model: the model's input normalization ((RGB - mean) / std), zero padding at the bottom and
right to the model's ``input_multiple`` (after normalizing, so the padding is the mean colour, as in
training's validation), the forward, the division by the model's ``density_scale`` and the crop to the
image's cells.

The custom ops the models call at inference lower to standard operators through their reference maths
(:mod:`crowdkernels.ops.reference`): while ``torch.export`` traces, :func:`crowdkernels._ext.backend` (the one
decision of which kernel runs an op) picks the reference, so HMoDE's gating (eq. 1) is traced as
interpolations, softmaxes and sums. L2SM's forward selects its dense regions (sec. 3.3, 4.2), a
data-dependent number of boxes that does not trace; while exporting, it re-predicts every region and selects
per region with ``torch.where`` (the same maps; :meth:`crowdkernels.models.L2SM._forward_every_region`).
Adaptive average pooling (SPN's pyramid), which ONNX lacks for arbitrary sizes, is decomposed into two matrix
products (:func:`_adaptive_avg_pool2d_decomposition`).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._constants import VERSION
from .._options import Option
from ..models.conventions import Conventions, conventions_of
from ..data.transforms import normalize_image
from .checkpoint import model_from_checkpoint
from .predict import final_of

__all__ = ["export", "OnnxModel", "ONNX_OPSET", "INPUT_NAME", "OUTPUT_NAME", "DEPLOY_HINT", "EXPORT_OPTIONS",
           "FORMATS"]

#: The ONNX opset :func:`export` writes by default (ONNX Runtime 1.16 and later run it).
ONNX_OPSET = 18
INPUT_NAME, OUTPUT_NAME = "images", "cells"
FORMATS = ("onnx", "pt2")

#: ``crowdkernels export``'s options (:func:`export`'s arguments)
EXPORT_OPTIONS = (
    Option("--checkpoint", required=True, type=Path,
           help="a .pt from crowdkernels train, or the authors' released HMoDE weights"),
    Option("--out", required=True, type=Path, help="the file to write (e.g. model.onnx)"),
    Option("--format", choices=FORMATS, default="onnx", help="onnx (default) or pt2 (torch.export.load reads it)"),
    Option("--opset", type=int, default=ONNX_OPSET, help=f"the ONNX opset; default: {ONNX_OPSET}"),
)

DEPLOY_HINT = "pip install 'crowdkernels[deploy]' (or: pip install onnx onnxscript onnxruntime)"


def _require(*modules: str) -> None:
    """ImportError in one line saying what to install, when an optional deploy package is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed: {DEPLOY_HINT}")


class _Deployed(nn.Module):
    """The counter as one module: RGB [N, 3, H, W] in [0, 1] -> people per cell [N, 1, ceil(H/s), ceil(W/s)]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        conv = conventions_of(model)
        self.model = model
        self.norm = conv.input_norm
        # the multiple the model's own forward pads to as well, so that its padding (zeros after normalizing,
        # as here) has nothing left to do, whatever the image size: traced with one example size, a model's
        # "pad if needed" would otherwise be recorded for that size only
        self.multiple = math.lcm(int(conv.input_multiple), int(conv.forward_multiple))
        self.scale = float(conv.density_scale)
        self.stride = conv.stride

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        H, W = images.shape[-2:]
        x = normalize_image(images, self.norm)
        m = self.multiple
        # the padded size written as m * ceil(H / m), so that the tracer knows it to be a multiple of m (and
        # of every stride below it) for every H, instead of recording what held for the example's size; with
        # non-negative operands only (the ONNX exporter turns a floor division into Div, which truncates)
        x = F.pad(x, (0, (W + m - 1) // m * m - W, 0, (H + m - 1) // m * m - H))
        out = final_of(self.model(x)) / self.scale
        s = self.stride
        # the crop as a gather: a slice would be traced as "no crop" or "a crop" by the example's size, a
        # guard that a .pt2 program then enforces (and an ONNX graph ignores)
        rows = torch.arange((H + s - 1) // s, device=out.device)
        cols = torch.arange((W + s - 1) // s, device=out.device)
        return out.index_select(-2, rows).index_select(-1, cols)


def _adaptive_avg_pool2d_decomposition(x, output_size):
    """``aten.adaptive_avg_pool2d`` for any H and W (SPN's pyramid): output cell (i, j) of (oh, ow) is the mean
    of rows floor(i H / oh) .. ceil((i + 1) H / oh) - 1 and of the columns alike (PyTorch's definition), as
    P_h @ x @ P_w^T with P[i, y] = 1 / (window length) inside window i. ONNX has no adaptive pooling, and the
    exporter's fixed-kernel lowering holds only for the traced size."""

    def windows(n: int, size) -> torch.Tensor:
        i = torch.arange(n, device=x.device)
        start = torch.div(i * size, n, rounding_mode="floor")
        stop = -torch.div(-(i + 1) * size, n, rounding_mode="floor")
        pos = torch.arange(size, device=x.device)
        inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < stop[:, None])
        return inside.to(x.dtype) / (stop - start).to(x.dtype)[:, None]

    oh, ow = output_size
    return windows(oh, x.shape[-2]) @ x @ windows(ow, x.shape[-1]).transpose(0, 1)


def _decompositions() -> dict:
    """What :func:`export` lowers further than torch.export does by itself (see each function)."""
    aten = torch.ops.aten
    return {aten.adaptive_avg_pool2d.default: _adaptive_avg_pool2d_decomposition,
            aten._adaptive_avg_pool2d.default: _adaptive_avg_pool2d_decomposition}


def _metadata(model: nn.Module, name: str | None, cfg: dict) -> dict:
    """The ONNX file's metadata_props: each value a JSON text (``null`` for a setting the training did not have)."""
    conv = conventions_of(model)
    meta = {"model": name, "stride": conv.stride, "input_multiple": conv.input_multiple,
            "max_size": cfg.get("max_size"), "tile": cfg.get("tile"), "crowdkernels_version": VERSION,
            "input": f"{INPUT_NAME}: float32 [N, 3, H, W], RGB in [0, 1]",
            "output": f"{OUTPUT_NAME}: float32 [N, 1, ceil(H/s), ceil(W/s)], people per cell (s = stride)"}
    return {key: json.dumps(value) for key, value in meta.items()}


def export(checkpoint_or_model, out, format: str = "onnx", *, opset: int = ONNX_OPSET,
           example_size: tuple[int, int] = (256, 320)) -> Path:
    """Writes a trained counter to ``out`` as one file: ONNX (``format="onnx"``) or a ``torch.export``
    program (``"pt2"``, :func:`torch.export.load` reads it).

    Args:
        checkpoint_or_model: a checkpoint (any file :func:`crowdkernels.load` reads: ``crowdkernels train``'s,
            the authors' released HMoDE weights) or a model of :mod:`crowdkernels.models` (its declared
            conventions are used).
        out: the file to write.
        format: "onnx" or "pt2".
        opset: the ONNX opset (default :data:`ONNX_OPSET`, 18).
        example_size: (H, W) of the example image the graph is traced with; the exported H and W are dynamic.

    The graph: input ``images`` float32 [N, 3, H, W], RGB in [0, 1] (not normalized); output ``cells``
    float32 [N, 1, ceil(H/s), ceil(W/s)], people per output cell (normalization, padding to the model's
    ``input_multiple`` and the division by its ``density_scale`` are inside). The ONNX file's
    ``metadata_props`` hold, each as a JSON text, ``model``, ``stride``, ``input_multiple``, ``max_size`` and
    ``tile`` (the checkpoint's training settings, ``null`` when absent), ``crowdkernels_version``, and the
    ``input`` and ``output`` described; ``onnx.checker`` accepts it. A .pt2 file holds the same in its extra
    file ``crowdkernels.json``. Returns the path written. ImportError in one line when onnx/onnxscript are
    not installed. L2SM's forward, which gathers the regions it selects (a data-dependent number of boxes),
    is traced in fixed shapes instead: every region is re-predicted and the selection picks per region
    (:meth:`crowdkernels.models.L2SM._forward_every_region`; the same maps, tested).
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if format == "onnx":
        _require("onnx", "onnxscript")
    if isinstance(checkpoint_or_model, nn.Module):
        model, name, cfg = checkpoint_or_model.cpu().eval(), type(checkpoint_or_model).__name__.lower(), {}
    else:
        model, ckpt = model_from_checkpoint(checkpoint_or_model, "cpu")
        name, cfg = ckpt.get("model_name"), ckpt.get("config") or {}
    if conventions_of(model).stride is None:
        raise ValueError(f"{type(model).__name__} declares no output stride (Conventions.stride): the exported "
                         "graph needs it to crop its map")
    deployed = _Deployed(model).eval()
    example = torch.rand(2, 3, *example_size)
    dim = torch.export.Dim.DYNAMIC
    shapes = {"images": {0: dim, 2: dim, 3: dim}}
    with torch.no_grad():
        program = torch.export.export(deployed, (example,), dynamic_shapes=shapes)
        program = program.run_decompositions(_decompositions())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = _metadata(model, name, cfg)
    if format == "pt2":
        torch.export.save(program, out, extra_files={"crowdkernels.json": json.dumps(meta)})
        return out
    import onnx

    onnx_program = torch.onnx.export(program, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                     opset_version=opset, dynamo=True, optimize=True, verbose=False)
    proto = onnx_program.model_proto
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save_model(proto, str(out))
    onnx.checker.check_model(str(out), full_check=True)
    return out


class OnnxModel(nn.Module):
    """An exported ONNX counter run by ONNX Runtime's CPU provider, as a model the :class:`crowdkernels.Counter`
    feeds: ``forward(images [N, 3, H, W] RGB in [0, 1])`` -> people per cell. Its conventions say that the
    graph does the rest: no input normalization, density scale 1, no padding by the caller (the graph pads
    after normalizing), the output stride from the file's metadata."""

    def __init__(self, path, threads: int | None = None):
        super().__init__()
        _require("onnx", "onnxruntime")
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, options, providers=["CPUExecutionProvider"])
        #: the file's metadata_props (see :func:`export`), decoded
        self.metadata = {k: json.loads(v) for k, v in self.session.get_modelmeta().custom_metadata_map.items()}
        self.conventions = Conventions(input_norm=None, density_scale=1.0, input_multiple=1,
                                       stride=self.metadata.get("stride"))
        self.input_norm = None

    @property
    def stride(self):
        return self.conventions.stride

    @property
    def input_multiple(self) -> int:
        return 1

    @property
    def density_scale(self) -> float:
        return 1.0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (cells,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})
        return torch.from_numpy(cells)
