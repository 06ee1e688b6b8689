"""int8 quantization of an exported counter (:func:`crowdkernels.engine.quantize.quantize`): the file loads in
ONNX Runtime and counts close to the float file, the nodes kept float stay float and the rest is int8, the
metadata survives (``crowdkernels.load`` counts with it), and bad arguments are named."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx", reason="onnx is not installed: pip install 'crowdkernels[deploy]'")
pytest.importorskip("onnxscript", reason="onnxscript is not installed: pip install 'crowdkernels[deploy]'")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install 'crowdkernels[deploy]'")

import crowdkernels as ck  # noqa: E402
from crowdkernels.engine.export import export  # noqa: E402
from crowdkernels.engine.quantize import float_nodes, quantize  # noqa: E402
from test_inference import _checkpoint  # noqa: E402

SIZE = (64, 96)
#: Random weights at width 0.125: each of csrnet's 17 convolutions rounds its input to 1/255 of its calibrated
#: range and its weights to 1/127 of each channel's, and those errors add up: the int8 map measured 4-6% off
#: the float map (relative L2) and the counts 1-1.5%, with and without the first convolution float. The
#: bounds are three times that: loose for rounding, far below what a wrong range or a dropped node gives.
MAP_RTOL = 0.15   # ||int8 map - float map|| / ||float map||
COUNT_RTOL = 0.05


def _images(n: int, seed: int) -> list:
    """Smooth RGB images [3, H, W] in [0, 1] (random blobs upsampled): more like photos than pixel noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, SIZE[0] // 8, SIZE[1] // 8, generator=g)
    return list(torch.nn.functional.interpolate(low, size=SIZE, mode="bilinear", align_corners=False).clamp(0, 1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize")
    return export(_checkpoint(root / "best.pt", "csrnet"), root / "model.onnx")


def _cells(path, images):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": torch.stack(images).numpy()})[0]


def _conv_weights_float(model) -> dict:
    """Conv name -> True when its weight is a float initializer, False when a DequantizeLinear makes it."""
    producer = {o: n.op_type for n in model.graph.node for o in n.output}
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    out = {}
    for n in model.graph.node:
        if n.op_type == "Conv":
            assert n.input[1] in floats or producer.get(n.input[1]) == "DequantizeLinear", n.name
            out[n.name] = n.input[1] in floats
    return out


@pytest.mark.parametrize("keep", [(), ("last",), ("first", "last")])
def test_int8_counts_near_float_and_keeps_the_named_nodes_float(exported, tmp_path, keep):
    out = quantize(exported, tmp_path / "int8.onnx", _images(4, seed=0), keep_float=keep)
    model = onnx.load(str(out))
    kept = set(float_nodes(model, keep))
    assert len(kept) == len(keep)  # csrnet: one first and one last convolution
    weights_float = _conv_weights_float(model)
    assert {name for name, f in weights_float.items() if f} == kept
    assert len(weights_float) > len(kept)  # every other convolution is int8
    int8 = [i for i in model.graph.initializer if i.data_type == onnx.TensorProto.INT8]
    assert int8

    held_out = _images(2, seed=1)
    want, got = _cells(exported, held_out), _cells(out, held_out)
    assert got.shape == want.shape and np.isfinite(got).all()
    assert float(np.linalg.norm(got - want)) <= MAP_RTOL * float(np.linalg.norm(want))
    np.testing.assert_allclose(got.sum(axis=(1, 2, 3)), want.sum(axis=(1, 2, 3)), rtol=COUNT_RTOL)

    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert meta["model"] == "csrnet" and meta["stride"] == 8
    assert meta["quantization"]["keep_float"] == list(keep) and meta["quantization"]["calibration_images"] == 4
    counter = ck.load(out)
    assert counter.count(held_out[0]) == pytest.approx(float(got[0].sum()), rel=1e-5, abs=1e-6)


def test_calibration_images_may_be_paths(exported, tmp_path):
    from PIL import Image

    paths = []
    for k, rgb in enumerate(_images(2, seed=2)):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(paths[-1])
    out = quantize(exported, tmp_path / "int8.onnx", iter(paths))
    assert np.isfinite(_cells(out, _images(1, seed=3))).all()


def test_bad_arguments_are_named(exported, tmp_path):
    out = tmp_path / "int8.onnx"
    with pytest.raises(ValueError, match="calibration_images is empty"):
        quantize(exported, out, [])
    with pytest.raises(TypeError, match="calibration_images must be an iterable"):
        quantize(exported, out, _images(1, seed=0)[0])
    with pytest.raises(TypeError, match=r"calibration_images\[1\] must be an image path or a float tensor"):
        quantize(exported, out, [_images(1, seed=0)[0], 42])
    with pytest.raises(ValueError, match=r"calibration_images\[0\] must hold RGB in \[0, 1\]"):
        quantize(exported, out, [_images(1, seed=0)[0] * 255])
    not_onnx = tmp_path / "notes.onnx"
    not_onnx.write_text("not a model\n")
    with pytest.raises(ValueError, match="onnx_path: .*notes.onnx is not an ONNX file"):
        quantize(not_onnx, out, _images(1, seed=0))
    with pytest.raises(ValueError, match="method must be one of"):
        quantize(exported, out, _images(1, seed=0), method="mean")
    with pytest.raises(ValueError, match=r"keep_float names no node \['nope'\]"):
        quantize(exported, out, _images(1, seed=0), keep_float=["last", "nope"])
    assert not out.exists()


def test_without_onnxruntime_it_says_what_to_install(exported, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"^onnxruntime not installed: pip install 'crowdkernels\[deploy\]'"):
        quantize(exported, tmp_path / "int8.onnx", _images(1, seed=0))
