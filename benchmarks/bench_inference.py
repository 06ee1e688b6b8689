"""Counting on the CPU, one image at a time, ShanghaiTech-B-sized (1024x768), csrnet and hmode at width 1
(random weights: the timings do not depend on them), through:

- "eager": the per-image loop lwcc and the released test.py run: model.eval(), torch.no_grad(), normalize,
  forward, sum (divided by the model's density scale);
- "eager-tuned": the same loop under torch.inference_mode with the model and the image channels-last;
- "counter": the Counter's default path, ``crowdkernels.load(ckpt).count``;
- "ort-fp32": the file ``crowdkernels export`` writes, run by ONNX Runtime's CPU provider (graph optimization
  ORT_ENABLE_ALL, intra-op threads = the machine's cores);
- "ort-int8": that file statically quantized by ``onnxruntime.quantization.quantize_static`` (QDQ, int8
  weights per channel, uint8 activations, MinMax ranges calibrated on crops of a few ShanghaiTech-B training
  images of ../shared/data; the path is skipped when they are absent).

Every path counts the same images; each fp32 path's counts equal the eager loop's to 1e-4 relative (checked).
The int8 path's error is its mean relative count difference from the fp32 graph on held-out real images
(other sample images than the calibration ones): with random weights that measures how faithfully int8
reproduces the float network, not an accuracy against ground truth.

    # the table of benchmarks/RESULTS.md: every path side by side in one process (a few minutes)
    PYTHONPATH=. nice -n 10 python benchmarks/bench_inference.py
    # pytest-benchmark (check mode, as CI runs it: width 0.125, 64x96 images, each path once)
    PYTHONPATH=. python -m pytest benchmarks/bench_inference.py --benchmark-disable
"""
from __future__ import annotations

import os
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import pytest
import torch

import crowdkernels as ck
from crowdkernels.data.transforms import normalize_image
from crowdkernels.engine.checkpoint import save_checkpoint
from crowdkernels.engine.config import TrainConfig
from crowdkernels.engine.predict import final_of
from crowdkernels.models import build_model, conventions_of

MODELS = ("csrnet", "hmode")
PATHS = ("eager", "eager-tuned", "counter", "ort-fp32", "ort-int8")
FP32_RTOL = 1e-4
FULL = dict(width=1.0, size=(768, 1024))   # ShanghaiTech B: 1024 wide, 768 high
CHECK = dict(width=0.125, size=(64, 96))
CALIBRATION = 4          # training images calibrating int8
CALIBRATION_CROP = 384   # calibrated on 384x384 crops (the ranges of a full image at a fraction of the memory)
HELD_OUT = 6             # other sample images measuring int8's count error
THREADS = os.cpu_count() or 1


def _have_deploy() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def _samples() -> list:
    here = pathlib.Path(__file__).resolve().parents[1]
    shared = pathlib.Path(os.environ.get("CROWDKERNELS_SHARED", here.parent / "shared"))
    folder = shared / "data" / "ShanghaiTech" / "part_B" / "train_data" / "images"
    return sorted(folder.glob("*.jpg")) if folder.is_dir() else []


def _rgb(path) -> torch.Tensor:
    from PIL import Image
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


# ------------------------------------------------------------------------------------------------ paths
class Paths:
    """Every path of one model, built once: ``count[path](rgb [3, H, W] in [0, 1]) -> float``."""

    def __init__(self, name: str, width: float, root: pathlib.Path, calibration: list):
        torch.manual_seed(0)
        self.name = name
        self.model = build_model(name, width=width).eval()
        conv = conventions_of(self.model)
        self.norm, self.scale = conv.input_norm, float(conv.density_scale)
        self.ckpt = root / f"{name}.pt"
        cfg = TrainConfig(out=str(root), model=name, model_kwargs={"width": width}, dataset="folder")
        save_checkpoint(self.ckpt, {"model_name": name, "config": cfg.to_dict(), "model": self.model.state_dict(),
                                    "epoch": 1, "step": 0})
        self.tuned = build_model(name, width=width).eval().to(memory_format=torch.channels_last)
        self.tuned.load_state_dict(self.model.state_dict())
        self.counter = ck.load(self.ckpt, "cpu")
        self.count = {"eager": self.eager, "eager-tuned": self.eager_tuned, "counter": self.counter.count}
        if _have_deploy():
            from crowdkernels.engine.export import export
            self.onnx = export(self.ckpt, root / f"{name}.onnx")
            self.fp32 = self._session(self.onnx)
            self.count["ort-fp32"] = lambda rgb: self._run(self.fp32, rgb)
            if calibration:
                self.int8_path = self._quantize(root, calibration)
                self.int8 = self._session(self.int8_path)
                self.count["ort-int8"] = lambda rgb: self._run(self.int8, rgb)

    def eager(self, rgb: torch.Tensor) -> float:
        # lwcc / the released test.py: one image, no_grad, normalize, forward, sum
        with torch.no_grad():
            x = normalize_image(rgb[None], self.norm)
            return float(final_of(self.model(x)).sum()) / self.scale

    def eager_tuned(self, rgb: torch.Tensor) -> float:
        with torch.inference_mode():
            x = normalize_image(rgb[None], self.norm).contiguous(memory_format=torch.channels_last)
            return float(final_of(self.tuned(x)).sum()) / self.scale

    @staticmethod
    def _session(path):
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = THREADS
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    @staticmethod
    def _run(session, rgb: torch.Tensor) -> float:
        (cells,) = session.run(None, {"images": rgb[None].numpy()})
        return float(cells.sum(dtype=np.float64))

    def _quantize(self, root: pathlib.Path, calibration: list) -> pathlib.Path:
        from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                              quantize_static)
        from onnxruntime.quantization.shape_inference import quant_pre_process

        class Reader(CalibrationDataReader):
            def __init__(self, images):
                self.it = iter([{"images": im[None].numpy()} for im in images])

            def get_next(self):
                return next(self.it, None)

        pre = root / f"{self.name}.pre.onnx"
        quant_pre_process(str(self.onnx), str(pre), skip_symbolic_shape=True)
        out = root / f"{self.name}.int8.onnx"
        quantize_static(str(pre), str(out), Reader(calibration), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
        return out


def _crops(paths, crop: int) -> list:
    out = []
    for p in paths:
        rgb = _rgb(p)
        H, W = rgb.shape[-2:]
        c = min(crop, H, W)
        top, left = (H - c) // 2, (W - c) // 2
        out.append(rgb[:, top:top + c, left:left + c].contiguous())
    return out


# ------------------------------------------------------------------------------------------------ pytest
@pytest.fixture(scope="module")
def built(request, tmp_path_factory):
    full = not request.config.getoption("benchmark_disable")
    setting = FULL if full else CHECK
    samples = _samples()
    crop = CALIBRATION_CROP if full else min(setting["size"])
    calibration = _crops(samples[:CALIBRATION if full else 1], crop)
    root = tmp_path_factory.mktemp("inference")
    image = torch.rand(3, *setting["size"], generator=torch.Generator().manual_seed(0))
    return {name: Paths(name, setting["width"], root, calibration) for name in MODELS}, image


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", MODELS)
def test_inference(benchmark, built, name, path):
    paths, image = built
    if path.startswith("ort") and not _have_deploy():
        pytest.skip("onnx, onnxscript and onnxruntime are not installed: pip install 'crowdkernels[deploy]'")
    if path not in paths[name].count:
        pytest.skip("no ShanghaiTech-B training images in ../shared/data to calibrate int8 on")
    count = paths[name].count[path]
    got = benchmark.pedantic(count, args=(image,), rounds=3, warmup_rounds=1)
    want = paths[name].eager(image)
    benchmark.extra_info.update(count=got, eager_count=want)
    if path != "ort-int8":
        assert abs(got - want) <= FP32_RTOL * abs(want)


# ------------------------------------------------------------------------------------------------ the table
def measure(rounds: int = 5) -> list:
    """Every (model, path) at 1024x768, interleaved round by round (so a slow spell of the shared machine
    falls on every path alike); returns rows for the table."""
    samples = _samples()
    calibration = _crops(samples[:CALIBRATION], CALIBRATION_CROP)
    held_out = [_rgb(p) for p in samples[CALIBRATION:CALIBRATION + HELD_OUT]]
    image = held_out[0] if held_out else torch.rand(3, *FULL["size"], generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            t0 = time.perf_counter()
            p = Paths(name, FULL["width"], pathlib.Path(tmp), calibration)
            print(f"{name}: built (export, quantization) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            names = list(p.count)
            counts = {k: p.count[k](image) for k in names}  # warm-up, and the counts compared
            times = {k: [] for k in names}
            for r in range(rounds):
                for k in names:
                    t = time.perf_counter()
                    p.count[k](image)
                    times[k].append(time.perf_counter() - t)
                print(f"{name}: round {r + 1}/{rounds}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in names),
                      file=sys.stderr)
            int8_err = None
            if "ort-int8" in names and held_out:
                errs = []
                for im in held_out:
                    ref = p.count["ort-fp32"](im)
                    errs.append(abs(p.count["ort-int8"](im) - ref) / abs(ref))
                int8_err = (statistics.mean(errs), [p.count["ort-fp32"](im) for im in held_out[:2]])
            for k in names:
                # the speed-up is paired: the median over rounds of eager's time / this path's in the same round
                speedup = statistics.median(e / t for e, t in zip(times["eager"], times[k]))
                rel = abs(counts[k] - counts["eager"]) / abs(counts["eager"])
                rows.append(dict(model=name, path=k, median=statistics.median(times[k]), speedup=speedup,
                                 count=counts[k], rel=rel, int8_err=int8_err if k == "ort-int8" else None,
                                 times=times[k]))
            if os.environ.get("BENCH_PROFILE"):
                profile(p, image)
    return rows


def profile(p: Paths, image: torch.Tensor, top: int = 6) -> None:
    """Where one image's time goes: torch.profiler's top ops of the eager loop, ONNX Runtime's per-op-type
    totals of the fp32 and int8 graphs (printed to stderr)."""
    import json
    from collections import Counter as Tally

    import onnxruntime as ort
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        p.eager(image)
    print(f"{p.name} eager, torch.profiler:\n" + prof.key_averages().table(sort_by="self_cpu_time_total",
                                                                          row_limit=top), file=sys.stderr)
    for label, path in (("ort-fp32", p.onnx), ("ort-int8", getattr(p, "int8_path", None))):
        if path is None:
            continue
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = THREADS
        options.enable_profiling = True
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        Paths._run(session, image)
        Paths._run(session, image)
        trace = pathlib.Path(session.end_profiling())
        events = [e for e in json.loads(trace.read_text()) if e.get("cat") == "Node"
                  and e["name"].endswith("_kernel_time")]
        runs = max(1, sum(1 for e in json.loads(trace.read_text()) if e.get("name") == "model_run"))
        tally = Tally()
        for e in events:
            tally[e["args"].get("op_name", "?")] += e["dur"] / 1e6 / runs
        total = sum(tally.values())
        print(f"{p.name} {label}, ORT per-op-type s/image (kernel time, total {total:.2f} s): "
              + ", ".join(f"{op} {t:.2f}" for op, t in tally.most_common(top)), file=sys.stderr)
        trace.unlink()


def main() -> None:
    rows = measure(int(os.environ.get("BENCH_ROUNDS", "5")))
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, cores {THREADS}")
    print("| model | path | median s/image | speed-up vs eager (paired median) | count | rel. diff vs eager | int8 mean rel. error (held-out) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        err = "" if r["int8_err"] is None else f"{100 * r['int8_err'][0]:.2f}% (fp32 counts e.g. {r['int8_err'][1][0]:.4g})"
        print(f"| {r['model']} | {r['path']} | {r['median']:.3f} | {r['speedup']:.2f}x | {r['count']:.6g} | "
              f"{r['rel']:.1e} | {err} |")
    for r in rows:
        print(r["model"], r["path"], " ".join(f"{t:.3f}" for t in r["times"]), file=sys.stderr)


if __name__ == "__main__":
    main()
