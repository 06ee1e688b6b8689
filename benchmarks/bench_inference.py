"""Counting on the CPU, one image at a time, ShanghaiTech-B-sized (1024x768), csrnet and hmode at width 1
(random weights: the timings do not depend on them), through:

- "eager": the per-image loop lwcc and the released test.py run: model.eval(), torch.no_grad(), normalize,
  forward, sum (divided by the model's density scale);
- "eager-tuned": the same loop under torch.inference_mode with the model and the image channels-last;
- "counter": the Counter's default path, ``crowdkernels.load(ckpt).count``;
- "ort-fp32": the file ``crowdkernels export`` writes, run by ONNX Runtime's CPU provider (graph optimization
  ORT_ENABLE_ALL, intra-op threads = the machine's cores, or BENCH_THREADS);
- "ort-int8": that file quantized by :func:`crowdkernels.engine.quantize.quantize` with its default recipe
  (ONNX Runtime static quantization, QDQ, int8 weights per tensor, uint8 activations, MinMax ranges
  calibrated on up to 32 whole ShanghaiTech-B training images of ../shared/data, all but the 6 held out; the
  path is skipped when they are absent).

Every path counts the same images; each fp32 path's counts equal the eager loop's to 1e-4 relative (checked).
The int8 path's error is its mean relative count difference from the fp32 graph on held-out real images
(other sample images than the calibration ones): with random weights that measures how faithfully int8
reproduces the float network, not an accuracy against ground truth.

``--trained CHECKPOINT ...`` measures int8 on trained counters instead: for each checkpoint, the images its
training held out (``--val-from-train``; ``evaluation_dataset(config, None)``, at its max_size) counted by the
eager loop and by its int8 file (calibrated on 32 of the run's other training images), the MAE of each
against the ground truth, int8's mean relative count difference from fp32, and int8's paired speed-up.

    # the table of benchmarks/RESULTS.md: every path side by side in one process (a few minutes)
    PYTHONPATH=. nice -n 10 python benchmarks/bench_inference.py
    # int8 on trained weights (benchmarks/RESULTS.md, "int8 on trained weights")
    PYTHONPATH=. BENCH_THREADS=1 nice -n 10 python benchmarks/bench_inference.py \
        --trained runs/hmode/best.pt runs/csrnet/best.pt
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
from crowdkernels.data.readers import load_image
from crowdkernels.data.transforms import normalize_image
from crowdkernels.engine.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from crowdkernels.engine.config import TrainConfig
from crowdkernels.engine.predict import final_of
from crowdkernels.models import build_model, conventions_of

MODELS = ("csrnet", "hmode")
PATHS = ("eager", "eager-tuned", "counter", "ort-fp32", "ort-int8")
FP32_RTOL = 1e-4
FULL = dict(width=1.0, size=(768, 1024))   # ShanghaiTech B: 1024 wide, 768 high
CHECK = dict(width=0.125, size=(64, 96))
CALIBRATION = 32         # training images calibrating int8, whole, as the counter sees them
HELD_OUT = 6             # other sample images measuring int8's count error (random weights)
TIMED = 8                # held-out images timed per round (trained weights)
THREADS = int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1))  # torch's and ONNX Runtime's


def _have_deploy() -> bool:
    import importlib.util
    return all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))


def _samples() -> list:
    here = pathlib.Path(__file__).resolve().parents[1]
    shared = pathlib.Path(os.environ.get("CROWDKERNELS_SHARED", here.parent / "shared"))
    folder = shared / "data" / "ShanghaiTech" / "part_B" / "train_data" / "images"
    return sorted(folder.glob("*.jpg")) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------------ paths
class Paths:
    """Every path of one checkpoint's model, built once: ``count[path](rgb [3, H, W] in [0, 1]) -> float``."""

    def __init__(self, ckpt: pathlib.Path, root: pathlib.Path, calibration: list, int8_options: dict | None = None):
        self.model, saved = model_from_checkpoint(ckpt, "cpu")
        self.name = saved.get("model_name")
        conv = conventions_of(self.model)
        self.norm, self.scale = conv.input_norm, float(conv.density_scale)
        self.ckpt = ckpt
        self.tuned, _ = model_from_checkpoint(ckpt, "cpu")
        self.tuned = self.tuned.to(memory_format=torch.channels_last)
        self.counter = ck.load(self.ckpt, "cpu")
        self.count = {"eager": self.eager, "eager-tuned": self.eager_tuned, "counter": self.counter.count}
        if _have_deploy():
            from crowdkernels.engine.export import export
            self.onnx = export(self.ckpt, root / f"{self.name}.onnx")
            self.fp32 = self._session(self.onnx)
            self.count["ort-fp32"] = lambda rgb: self._run(self.fp32, rgb)
            if calibration:
                from crowdkernels.engine.quantize import quantize
                self.int8_path = quantize(self.onnx, root / f"{self.name}.int8.onnx", calibration,
                                          **(int8_options or {}))
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


def _random_checkpoint(name: str, width: float, root: pathlib.Path) -> pathlib.Path:
    """A checkpoint of ``name`` at ``width`` with random weights (seed 0), as ``crowdkernels train`` writes one."""
    torch.manual_seed(0)
    model = build_model(name, width=width)
    path = root / f"{name}.pt"
    cfg = TrainConfig(out=str(root), model=name, model_kwargs={"width": width}, dataset="folder")
    save_checkpoint(path, {"model_name": name, "config": cfg.to_dict(), "model": model.state_dict(),
                           "epoch": 1, "step": 0})
    return path


def _crops(paths, crop: int) -> list:
    out = []
    for p in paths:
        rgb = load_image(p)
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
    # check mode: one crop of the check size (int8 is built and run, not judged)
    calibration = samples[:CALIBRATION] if full else _crops(samples[:1], min(setting["size"]))
    root = tmp_path_factory.mktemp("inference")
    image = torch.rand(3, *setting["size"], generator=torch.Generator().manual_seed(0))
    return {name: Paths(_random_checkpoint(name, setting["width"], root), root, calibration) for name in MODELS}, image


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
    # ../shared/data holds a few sample images (24): HELD_OUT of them are kept out of the calibration
    n = max(0, min(CALIBRATION, len(samples) - HELD_OUT))
    calibration = samples[:n]
    held_out = [load_image(p) for p in samples[n:n + HELD_OUT]]
    image = held_out[0] if held_out else torch.rand(3, *FULL["size"], generator=torch.Generator().manual_seed(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            t0 = time.perf_counter()
            p = Paths(_random_checkpoint(name, FULL["width"], pathlib.Path(tmp)), pathlib.Path(tmp), calibration)
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
    totals of the fp32 and int8 graphs, and the fp32 ceiling: the image's convolution GFLOP (2 x the
    multiply-adds, counted by forward hooks), the rate ONNX Runtime's fp32 ``Conv`` runs them at, and this
    machine's fp32 matrix product (``torch.mm`` 4096^3) for comparison (printed to stderr)."""
    import json
    from collections import Counter as Tally

    import onnxruntime as ort
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    macs = []
    hooks = [m.register_forward_hook(lambda m, i, o: macs.append(o.numel() * m.weight[0].numel()))
             for m in p.model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        p.eager(image)
    for h in hooks:
        h.remove()
    conv_gflop = 2 * sum(macs) / 1e9
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
        if tally["Conv"]:
            print(f"{p.name} {label}: convolutions {conv_gflop:.1f} GFLOP at {conv_gflop / tally['Conv']:.0f} "
                  f"GFLOP/s; this machine's fp32 torch.mm runs at {_sgemm_rate():.0f} GFLOP/s", file=sys.stderr)


def _sgemm_rate(n: int = 4096, rounds: int = 5) -> float:
    """GFLOP/s of a float32 n x n matrix product here (the best of ``rounds``, after one warm-up)."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


# ------------------------------------------------------------------------------------------------ trained weights
def _run_data(ckpt: pathlib.Path):
    """(held-out dataset, calibration image paths) of a checkpoint's run: the images its training validated on
    (``evaluation_dataset(config, None)``: ``--val-from-train``'s seeded share, at its max_size, RGB in [0, 1])
    and CALIBRATION of the rest of its training split, evenly spaced in name order (never a held-out one)."""
    from dataclasses import replace

    from crowdkernels.data.specs import dataset_samples
    from crowdkernels.engine.pipeline import evaluation_dataset, split_off

    cfg = TrainConfig(**load_checkpoint(ckpt)["config"])
    root = pathlib.Path(cfg.root)
    if not root.is_absolute() and not root.is_dir():  # relative to where it was trained: the checkout
        cfg = replace(cfg, root=str(pathlib.Path(__file__).resolve().parents[1] / root))
    held_out, _ = evaluation_dataset(cfg, None)
    train, _ = dataset_samples(cfg.dataset, cfg.root, "train", fold=cfg.fold, whole=True)
    if cfg.val_from_train is not None:
        train, _ = split_off(train, cfg.val_from_train, cfg.seed)
    held = {s.image for s in held_out.samples}  # a dataset without a val split validates on training images
    train = [s for s in train if s.image not in held]
    pick = np.linspace(0, len(train) - 1, min(CALIBRATION, len(train))).round().astype(int)
    return held_out, [train[i].image for i in pick]


def trained(checkpoints: list, rounds: int = 3, int8_options: dict | None = None) -> list:
    """One row per trained checkpoint: its held-out images counted by the eager loop (fp32) and by the int8
    file :func:`crowdkernels.engine.quantize.quantize` makes of it (calibrated on its training images);
    MAE of each against the ground truth, int8's mean relative count difference from fp32, and int8's
    speed-up over the eager loop (TIMED held-out images per round, both paths interleaved round by round,
    paired median of eager's time / int8's)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in map(pathlib.Path, checkpoints):
            held_out, calibration = _run_data(ckpt)
            t0 = time.perf_counter()
            p = Paths(ckpt, pathlib.Path(tmp), calibration, int8_options)
            print(f"{ckpt}: built (export, quantization) in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
            images = [held_out[i]["image"] for i in range(len(held_out))]
            truth = np.asarray(held_out.counts, dtype=np.float64)
            fp32 = np.array([p.eager(im) for im in images])
            int8 = np.array([p.count["ort-int8"](im) for im in images])
            times = {"eager": [], "ort-int8": []}
            for r in range(rounds):
                for k in times:
                    t = time.perf_counter()
                    for im in images[:TIMED]:
                        p.count[k](im)
                    times[k].append(time.perf_counter() - t)
                print(f"{p.name}: round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
                      file=sys.stderr)
            cfg = load_checkpoint(ckpt)["config"]
            rows.append(dict(model=p.name, width=(cfg.get("model_kwargs") or {}).get("width", 1.0),
                             size=tuple(images[0].shape[-2:]), images=len(images),
                             mae_fp32=float(np.mean(np.abs(fp32 - truth))),
                             mae_int8=float(np.mean(np.abs(int8 - truth))),
                             rel=float(np.mean(np.abs(int8 - fp32) / np.abs(fp32))),
                             speedup=statistics.median(e / t for e, t in zip(times["eager"], times["ort-int8"])),
                             eager_s=statistics.median(times["eager"]) / min(TIMED, len(images)),
                             int8_s=statistics.median(times["ort-int8"]) / min(TIMED, len(images))))
    return rows


def main() -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trained", nargs="+", type=pathlib.Path, metavar="CHECKPOINT",
                        help="instead of the random-weights table: int8's count error and speed-up on each "
                             "checkpoint's own held-out images")
    parser.add_argument("--int8-options", type=json.loads, default={}, metavar="JSON",
                        help='keyword arguments of crowdkernels.engine.quantize.quantize other than its defaults, '
                             'e.g. \'{"per_channel": true, "keep_float": ["last"]}\' (--trained)')
    args = parser.parse_args()
    rounds = int(os.environ.get("BENCH_ROUNDS", "3" if args.trained else "5"))
    torch.set_num_threads(THREADS)
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()} (torch and ONNX Runtime), "
          f"cores {os.cpu_count()}")
    if args.trained:
        rows = trained(args.trained, rounds, args.int8_options)
        print("| model | width | held-out images (H x W) | fp32 MAE | int8 MAE | int8 mean rel. count error vs fp32 "
              "| int8 speed-up vs eager (paired median) | eager / int8 s/image |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['width']:g} | {r['images']} ({r['size'][0]} x {r['size'][1]}) | "
                  f"{r['mae_fp32']:.2f} | {r['mae_int8']:.2f} | {100 * r['rel']:.2f}% | {r['speedup']:.2f}x | "
                  f"{r['eager_s']:.3f} / {r['int8_s']:.3f} |")
        return
    rows = measure(rounds)
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
