"""An exported counter quantized to int8 for the CPU: ONNX Runtime's static quantization (QDQ format),
calibrated on training images.

The file :func:`crowdkernels.engine.export.export` writes becomes one whose convolutions run in int8
(ONNX Runtime's ``QLinearConv``, VNNI on CPUs that have it): the weights int8, one scale per tensor
(symmetric, w ~ s q, q in [-127, 127]); the activations uint8 per tensor, x ~ s (q - z) with the scale s and
zero point z fitted to the range the activation takes on the calibration images (MinMax). :func:`quantize`
does the whole job in one call and keeps the file's metadata, so ``crowdkernels.load(out)`` counts with it
as with the float file.

The defaults are the recipe with the smallest count error measured on trained counters (benchmarks/RESULTS.md,
"int8 on trained weights": HMoDE and CSRNet at width 0.25 on ShanghaiTech B at 512 px, mean relative count
difference from float 1.6-1.7% and 0.9-1.0% over three draws of 32 calibration images, 3.8-5.0x the eager
loop's speed). Per-channel weights, float last convolutions, Entropy or Percentile ranges and crops were
each no better there, and per-channel weights were 2.5x worse on CSRNet.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .._io import atomic_write
from ..data.readers import load_image
from ..data.transforms import shrink_image
from .export import INPUT_NAME, OUTPUT_NAME, _require

__all__ = ["quantize", "float_nodes", "CALIBRATION_METHODS", "KEEP_FLOAT"]

#: the calibration methods :func:`quantize` takes -> ONNX Runtime's ``CalibrationMethod`` names
_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
CALIBRATION_METHODS = tuple(_METHODS)
#: the node groups :func:`quantize`'s ``keep_float`` names (see :func:`float_nodes`)
KEEP_FLOAT = ("first", "last")
#: images per calibration pass: the histogram methods hold every activation of a pass in memory
_CHUNK = 4


def _rgb(item, index: int) -> torch.Tensor:
    """Calibration image ``index`` as float32 [3, H, W] RGB in [0, 1]."""
    what = f"calibration_images[{index}]"
    if isinstance(item, (str, Path)):
        return load_image(item)
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"{what} must be an image path or a float tensor [3, H, W] in [0, 1], "
                        f"got {type(item).__name__}")
    if item.dim() != 3 or item.shape[0] != 3 or not item.dtype.is_floating_point:
        raise ValueError(f"{what} must be a float tensor [3, H, W] (RGB), "
                         f"got {item.dtype} of shape {tuple(item.shape)}")
    t = item.detach().cpu().float()
    if not torch.isfinite(t).all() or float(t.min()) < 0.0 or float(t.max()) > 1.0:
        raise ValueError(f"{what} must hold RGB in [0, 1] (not normalized: the graph normalizes)")
    return t


class _Reader:
    """ONNX Runtime's calibration data reader over the images: one [1, 3, H, W] batch each, read and shrunk
    to ``max_size`` when asked for (so only one pass's images are in memory); ``set_range`` is how
    ``quantize_static`` calibrates in passes (its ``CalibStridedMinMax``)."""

    def __init__(self, images: list, max_size):
        self.images, self.max_size = images, max_size
        self.set_range(0, len(images))

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.todo = iter(range(start_index, end_index))

    def get_next(self):
        i = next(self.todo, None)
        if i is None:
            return None
        rgb = shrink_image(_rgb(self.images[i], i), self.max_size)
        return {INPUT_NAME: rgb[None].contiguous().numpy()}


def float_nodes(model, keep_float) -> list[str]:
    """The names of the nodes of ``model`` (an ``onnx.ModelProto``) that ``keep_float`` names: ``"first"``
    is every Conv that the input reaches through no other Conv (the convolution of the RGB image), ``"last"``
    every Conv that reaches the output through no other Conv (the convolutions writing the density map,
    and for HMoDE the gate's too); any other string is a node's name, kept as given."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def convs_from(start: list, step) -> list:
        # breadth-first from the start nodes, stopping at each Conv reached
        seen, found, todo = set(), [], list(start)
        while todo:
            n = todo.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if n.op_type == "Conv":
                found.append(n.name)
            else:
                todo.extend(step(n))
        return found

    names = set()
    for item in keep_float:
        if item == "first":
            start = [c for i in graph.input for c in consumers.get(i.name, [])]
            names.update(convs_from(start, lambda n: [c for o in n.output for c in consumers.get(o, [])]))
        elif item == "last":
            start = [producer[o.name] for o in graph.output if o.name in producer]
            names.update(convs_from(start, lambda n: [producer[i] for i in n.input if i in producer]))
        else:
            names.add(item)
    return sorted(names)


def quantize(onnx_path, out, calibration_images, *, max_size="metadata", method: str = "minmax",
             keep_float=(), per_channel: bool = False, activations: str = "uint8", op_types=None,
             extra_options: dict | None = None) -> Path:
    """Writes ``onnx_path`` (a counter :func:`crowdkernels.engine.export.export` wrote) to ``out`` with its
    convolutions in int8, calibrated on ``calibration_images``, and returns ``out``.

    The graph keeps its input and output (``images`` float32 [N, 3, H, W], RGB in [0, 1] -> ``cells``
    float32 [N, 1, ceil(H/s), ceil(W/s)], people per cell) and its metadata (plus ``quantization``, this
    call's recipe, as JSON). Quantized: the weights to int8 per tensor (or per output channel,
    ``per_channel``; symmetric), every activation feeding a quantized operator to uint8 per tensor
    (x ~ s (q - z), s and z fitted to its calibrated range), so convolutions run as integer ``QLinearConv``;
    MaxPool, Resize, Concat, Softmax and the other operators ONNX Runtime quantizes (``op_types``: all by
    default) follow. Kept float: the nodes ``keep_float`` names (:func:`float_nodes`; none by default: on
    the trained counters measured, keeping the first or the last convolutions float did not lower the count
    error), and what ONNX Runtime does not quantize: the input normalization, padding, the division by the
    density scale and the crop, so the counts come out as float32 people per cell.

    Args:
        onnx_path: the float ONNX file.
        out: the file to write.
        calibration_images: an iterable of image paths or float tensors [3, H, W] of RGB in [0, 1] (training
            images; never the images the quantized counter is evaluated on), each run through the float graph
            to measure the activations' ranges. Whole images, as the counter will see them (the benchmark calibrates
            on 32; 4 and 16 gave count errors within 0.3 percentage points of that).
        max_size: each calibration image is first shrunk as the Counter shrinks it (longest side, or a box);
            ``"metadata"`` (default): the ``max_size`` the file's metadata holds (the training's), None: never.
        method: how each activation's range is set from the calibration images: "minmax" (the extremes
            seen), "entropy" (the clipping that minimizes the KL divergence of the quantized histogram),
            "percentile" (the 99.999th percentile of |x|, symmetric).
        keep_float: node groups ("first", "last") or node names left in float (see :func:`float_nodes`).
        per_channel: one weight scale per output channel (True) or one per tensor (False).
        activations: "uint8" (asymmetric, the fast case on x86) or "int8".
        op_types: the operator types to quantize (e.g. ``["Conv"]``); None: every type ONNX Runtime can.
        extra_options: more of ``onnxruntime.quantization.quantize_static``'s ``extra_options`` (e.g.
            ``{"ActivationSymmetric": True}``).

    Raises:
        ImportError in one line when onnx or onnxruntime is not installed; ValueError naming the argument
        for a file that is not an ONNX counter, no calibration images, an unknown method or node;
        TypeError naming the image for a calibration image that is neither a path nor a tensor.
    """
    _require("onnx", "onnxruntime")
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if isinstance(calibration_images, (str, Path, torch.Tensor)):
        raise TypeError("calibration_images must be an iterable of images (paths or [3, H, W] tensors), "
                        f"got one {type(calibration_images).__name__}")
    images = list(calibration_images)
    if not images:
        raise ValueError("calibration_images is empty: quantization needs images to calibrate its ranges on")
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {CALIBRATION_METHODS}, got {method!r}")
    if activations not in ("uint8", "int8"):
        raise ValueError(f"activations must be 'uint8' or 'int8', got {activations!r}")
    if isinstance(keep_float, str):
        keep_float = (keep_float,)
    onnx_path = Path(onnx_path)
    try:
        source = onnx.load(str(onnx_path))
    except FileNotFoundError:
        raise ValueError(f"onnx_path: {onnx_path} not found") from None
    except Exception as exc:  # onnx raises DecodeError and others for files that are not ONNX
        raise ValueError(f"onnx_path: {onnx_path} is not an ONNX file ({type(exc).__name__})") from None
    if [i.name for i in source.graph.input] != [INPUT_NAME] or OUTPUT_NAME not in [o.name for o in source.graph.output]:
        raise ValueError(f"onnx_path: {onnx_path} is not a counter crowdkernels exported (its input must be "
                         f"{INPUT_NAME!r} and its output {OUTPUT_NAME!r})")
    meta = {p.key: p.value for p in source.metadata_props}
    if isinstance(max_size, str) and max_size == "metadata":
        max_size = json.loads(meta.get("max_size", "null"))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="crowdkernels-int8-") as tmp:
        pre, written = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(onnx_path), str(pre), skip_symbolic_shape=True)
        model = onnx.load(str(pre))
        exclude = float_nodes(model, keep_float)
        unknown = sorted(set(exclude) - {n.name for n in model.graph.node})
        if unknown:
            raise ValueError(f"keep_float names no node {unknown} (node groups: {KEEP_FLOAT})")
        # calibrated in passes of at most _CHUNK images (ONNX Runtime wants passes of equal length)
        options = {"CalibStridedMinMax": max(k for k in range(1, _CHUNK + 1) if len(images) % k == 0),
                   **(extra_options or {})}
        quantize_static(str(pre), str(written), _Reader(images, max_size), quant_format=QuantFormat.QDQ,
                        per_channel=per_channel, op_types_to_quantize=op_types, weight_type=QuantType.QInt8,
                        activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[activations],
                        calibrate_method=getattr(CalibrationMethod, _METHODS[method]),
                        nodes_to_exclude=exclude, extra_options=options)
        quantized = onnx.load(str(written))
    recipe = {"method": method, "keep_float": list(keep_float), "per_channel": per_channel,
              "calibration_images": len(images), "max_size": max_size, "weights": "int8",
              "activations": activations, "op_types": None if op_types is None else list(op_types),
              "extra_options": dict(extra_options or {})}
    del quantized.metadata_props[:]
    for key, value in {**meta, "quantization": json.dumps(recipe)}.items():
        quantized.metadata_props.add(key=key, value=value)
    atomic_write(out, lambda f: f.write(quantized.SerializeToString()))
    return out
