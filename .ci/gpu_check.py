"""The Python pieces of `bash .ci/gpu` (the one command that verifies crowdkernels on a CUDA GPU machine).

    python .ci/gpu_check.py probe                          # one line: GPU, torch, Triton, nvcc, sanitizer
    python .ci/gpu_check.py ops --device cuda [--json F]   # a small call of every CUDA and Triton op, fwd+bwd,
                                                           # against the CPU kernels (run under compute-sanitizer)
    python .ci/gpu_check.py train --device cuda --steps 3 [--models A,B] [--json F]   # AMP steps, each model
    python .ci/gpu_check.py report --stages F [--ops F] [--bench F] [--train F] [--json F]
                                                           # the closing table (stdout) and the JSON report

`--device cpu` runs `ops` and `train` on the CPU, as a dry run of the script (the CUDA and Triton kernels are
then not involved: the CPU kernels are compared with themselves, and autocast is off); CI does that.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def _write(path, data):
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)


# ------------------------------------------------------------------------------------------------ probe
def probe() -> int:
    import torch

    parts = [f"torch {torch.__version__}"]
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except Exception as exc:  # reported, not fatal: the probe says what is there
        parts.append(f"triton missing ({type(exc).__name__})")
    for tool in ("nvcc", "compute-sanitizer"):
        parts.append(f"{tool} {'found' if shutil.which(tool) else 'missing'}")
    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch; " + ", ".join(parts))
        return 1
    p = torch.cuda.get_device_properties(0)
    print(f"{torch.cuda.device_count()} x {p.name} (sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
          f"{p.multi_processor_count} SMs); " + ", ".join(parts))
    return 0


# ------------------------------------------------------------------------------------------------ ops
def _compare(name, got, want, tol, rows):
    import torch

    got = [got] if isinstance(got, torch.Tensor) else list(got)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    err = 0.0
    for g, w in zip(got, want):
        if g is None and w is None:
            continue
        g, w = g.detach().double().cpu(), w.detach().double().cpu()
        if g.shape != w.shape or not torch.isfinite(g).all():
            err = math.inf
            break
        scale = max(1.0, float(w.abs().max())) if w.numel() else 1.0
        err = max(err, float((g - w).abs().max()) / scale if w.numel() else 0.0)
    rows.append({"op": name, "max_rel_error": err, "tolerance": tol, "ok": err <= tol})


def ops(device: str) -> list:
    """One small forward and backward call of every op with a CUDA or Triton kernel, on `device`, each compared
    with the same call on the CPU (the C++ kernels). float64, so the tolerance is tight."""
    import torch

    import crowdkernels as ck

    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    rows = []

    def both(fn, *args, grads=False):
        """fn on the CPU and on `dev`; with grads, also the gradients of sum(out * w) w.r.t. the float args."""
        outs = []
        for d in ("cpu", dev):
            moved = [a.detach().to(d).requires_grad_(grads and a.is_floating_point()) if isinstance(a, torch.Tensor)
                     else a for a in args]
            out = fn(*moved)
            res = list(out) if isinstance(out, (tuple, list)) else [out]
            if grads:
                leaves = [m for m in moved if isinstance(m, torch.Tensor) and m.requires_grad]
                wsum = sum((r * torch.linspace(-1, 1, r.numel(), dtype=r.dtype, device=r.device).reshape(r.shape)).sum()
                           for r in res if r.is_floating_point())
                res += list(torch.autograd.grad(wsum, leaves, allow_unused=True))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            outs.append(res)
        return outs

    # density maps (CUDA: knn_sigma, density_splat)
    pts = [torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([47.0, 31.0], dtype=torch.float64)
           for n in (0, 1, 7, 40)]
    cpu_sig, dev_sig = ck.knn_sigma(pts[3]), ck.knn_sigma(pts[3].to(dev))
    _compare("knn_sigma", dev_sig, cpu_sig, 1e-9, rows)
    for style in ("exact", "csrnet", "matlab"):
        want = ck.density_maps(pts, (31, 47), style=style)
        got = ck.density_maps([p.to(dev) for p in pts], (31, 47), style=style)
        _compare(f"density_maps[{style}]", got, want, 1e-9, rows)
    want = ck.density_maps(pts, (31, 47), stride=4, deterministic=True)
    got = ck.density_maps([p.to(dev) for p in pts], (31, 47), stride=4, deterministic=True)
    _compare("density_maps[stride 4, deterministic]", got, want, 1e-9, rows)
    # region rescaling (CUDA: scale_regions, unscale_regions and their backwards)
    feats = torch.randn(2, 3, 13, 15, generator=g, dtype=torch.float64)
    boxes = torch.tensor([[0, 0, 0, 5, 7], [1, 3, 4, 6, 5], [0, 6, 8, 7, 7]])
    scale = torch.tensor([1.5, 2.0, 1.25], dtype=torch.float64)
    cpu, gpu = both(lambda f, b, s: ck.scale_regions(f, b, s, (12, 12)), feats, boxes, scale, grads=True)
    _compare("scale_regions fwd+bwd", gpu, cpu, 1e-9, rows)
    pred = torch.rand(3, 3, 12, 12, generator=g, dtype=torch.float64)
    cpu, gpu = both(lambda p, b, s, base: ck.unscale_regions(p, b, s, base), pred, boxes, scale, feats, grads=True)
    _compare("unscale_regions fwd+bwd", gpu, cpu, 1e-9, rows)
    # hierarchical gating (Triton on a GPU): both modes, K = 3 (N = 2) and K = 4 (N = 3)
    for K, N in ((3, 2), (4, 3)):
        groups = torch.tensor(list(itertools.combinations(range(K), N)))
        M = groups.shape[0]
        experts = [torch.rand(2, 1, 9 - k, 11 - 2 * k, generator=g, dtype=torch.float64) for k in range(K)]
        g1 = torch.randn(2, M * N, 3, 4, generator=g, dtype=torch.float64)
        g2 = torch.randn(2, M, 4, 3, generator=g, dtype=torch.float64)
        for mode in ("nearest", "bilinear"):
            cpu, gpu = both(lambda *a: ck.hierarchical_gating(list(a[:K]), a[K], a[K + 1], groups.to(a[0].device),
                                                             size=(17, 19), upsample=mode),
                            *experts, g1, g2, grads=True)
            _compare(f"hierarchical_gating[K{K}N{N} {mode}] fwd+bwd", gpu, cpu, 1e-9, rows)
    # local counts (Triton on a GPU): keep and drop edges
    p, t = (torch.rand(2, 1, 29, 37, generator=g, dtype=torch.float64) for _ in range(2))
    for edge in ("keep", "drop"):
        cpu, gpu = both(lambda a, b: ck.local_counts(a, b, 0.125, edge=edge), p, t, grads=True)
        _compare(f"local_counts[{edge}] fwd+bwd", gpu, cpu, 1e-9, rows)
    return rows


# ------------------------------------------------------------------------------------------------ train
def models(device: str):
    """(name, model) for every model the package has, small enough for a few steps."""
    import crowdkernels as ck

    width = 0.25 if device == "cuda" else 0.125
    yield "CSRNet", ck.CSRNet(width=width)
    yield "SPN", ck.SPN(width=width)
    yield "L2SM", ck.L2SM(width=width)
    yield "HMoDE paper K3 N2", ck.HMoDE(experts=3, group_size=2, width=width)
    yield "HMoDE paper K4 N3", ck.HMoDE(experts=4, group_size=3, width=width)
    yield "HMoDE official", ck.HMoDE(variant="official", width=width)


def train(device: str, steps: int, only=None) -> list:
    """`steps` training steps of each model under AMP (the training engine's autocast: bfloat16 where the GPU
    has it, float16 with a gradient scaler otherwise; off on the CPU): losses finite, parameters moved."""
    import torch

    import crowdkernels as ck
    from crowdkernels.engine.predict import autocast

    dev = torch.device(device)
    size, batch = (128, 2) if device == "cuda" else (64, 2)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(batch, 3, size, size, generator=g).to(dev)
    points = [torch.rand(int(n), 2, generator=g) * (size - 1) for n in (30, 80)]
    targets = {"density": ck.density_maps(points, (size, size)).to(dev), "points": [q.to(dev) for q in points]}
    rows = []
    for name, model in models(device):
        if only and not any(o.strip() and o.strip() in name for o in only.split(",")):
            continue
        torch.manual_seed(0)
        model = model.to(dev).train()
        criterion = model.criterion()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        use_scaler = dev.type == "cuda" and not torch.cuda.is_bf16_supported()
        scaler = torch.amp.GradScaler("cuda", enabled=use_scaler)
        before = [q.detach().clone() for q in model.parameters()]
        losses, start, error = [], time.perf_counter(), None
        try:
            for _ in range(steps):
                with autocast(dev, True):
                    output = model(images)
                total = criterion(output, targets)["total"]
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(total.detach()))
            if dev.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # reported per model; the stage fails
            error = f"{type(exc).__name__}: {exc}"
        moved = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
        ok = error is None and len(losses) == steps and all(math.isfinite(v) for v in losses) and moved
        rows.append({"model": name, "losses": losses, "parameters_moved": moved, "seconds":
                     round(time.perf_counter() - start, 2), "amp": str(autocast(dev, True)) if dev.type == "cuda"
                     else "off (cpu)", "ok": ok, **({"error": error} if error else {})})
        model.to("cpu")
        del model, optimizer
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------ report
# benchmark groups -> (kernel name fragment, baseline name fragment, target ratio or seconds)
def bench_summary(path: str) -> list:
    """From a pytest-benchmark JSON: per group, the median of each implementation, and for the pairs the
    ratio baseline / kernel; the 182-image density batch against its 0.2 s target."""
    with open(path) as f:
        data = json.load(f)
    groups = {}
    for b in data.get("benchmarks", []):
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    rows = []
    baselines = ("eager", "loop", "released_structure", "reference", "avgpool")
    for group, items in groups.items():
        base = next((b for b in items if any(f"[{k}" in b["name"] or f"-{k}" in b["name"] for k in baselines)), None)
        for b in items:
            med = b["stats"]["median"]
            row = {"group": group, "name": b["name"], "median_ms": round(med * 1e3, 3)}
            target_s = b.get("extra_info", {}).get("target_s")
            if target_s:
                row.update(target=f"<= {target_s} s", met=med <= target_s)
            if base is not None and b is not base:
                row["speedup"] = round(base["stats"]["median"] / med, 2)
            for k, v in b.get("extra_info", {}).items():
                if k not in ("target_s", "baseline"):
                    row[k] = v
            rows.append(row)
    return rows


def _load(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def report(stages_path, ops_path, bench_path, train_path, json_path) -> int:
    """Prints the closing table (stages, then the highlights) and writes the full JSON report."""
    stages = []
    if stages_path and os.path.exists(stages_path):
        with open(stages_path) as f:
            for line in f:
                if line.strip():
                    name, status, seconds, detail = (line.rstrip("\n").split("\t") + ["", "", ""])[:4]
                    stages.append({"stage": name, "status": status, "seconds": float(seconds or 0), "detail": detail})
    full = {"stages": stages, "ops": _load(ops_path), "train": _load(train_path),
            "benchmarks": bench_summary(bench_path) if bench_path and os.path.exists(bench_path) else None}
    _write(json_path, full)
    lines = ["", "== .ci/gpu summary", f"{'stage':<12} {'status':<8} {'seconds':>8}  detail"]
    for s in stages:
        lines.append(f"{s['stage']:<12} {s['status']:<8} {s['seconds']:>8.0f}  {s['detail']}")
    if full["ops"]:
        bad = [r["op"] for r in full["ops"] if not r["ok"]]
        lines.append(f"ops vs CPU: {len(full['ops']) - len(bad)}/{len(full['ops'])} within tolerance"
                     + (f"; off: {', '.join(bad)}" if bad else ""))
    if full["train"]:
        lines.append("AMP steps: " + "; ".join(
            f"{r['model']} {'ok' if r['ok'] else 'FAILED'}" + (f" ({r['losses'][0]:.3g} -> {r['losses'][-1]:.3g})"
                                                              if r["losses"] else "")
            for r in full["train"]))
    for r in full["benchmarks"] or []:
        if "speedup" in r or "target" in r:
            extra = f" {r['speedup']}x vs baseline" if "speedup" in r else ""
            extra += f" target {r['target']}: {'met' if r['met'] else 'NOT met'}" if "target" in r else ""
            lines.append(f"bench {r['name']}: {r['median_ms']} ms{extra}")
    total = sum(s["seconds"] for s in stages)
    failed = [s["stage"] for s in stages if s["status"] not in ("pass", "not run")]
    lines.append(f"total {total:.0f} s; " + ("all stages passed" if not failed else f"FAILED: {', '.join(failed)}"))
    print("\n".join(lines))
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("probe")
    p_ops = sub.add_parser("ops")
    p_ops.add_argument("--device", default="cuda")
    p_ops.add_argument("--json")
    p_train = sub.add_parser("train")
    p_train.add_argument("--device", default="cuda")
    p_train.add_argument("--steps", type=int, default=3)
    p_train.add_argument("--json")
    p_train.add_argument("--models", help="comma-separated name fragments (default: every model)")
    p_rep = sub.add_parser("report")
    for name in ("stages", "ops", "bench", "train", "json"):
        p_rep.add_argument(f"--{name}")
    args = parser.parse_args(argv)
    if args.cmd == "probe":
        return probe()
    if args.cmd == "ops":
        rows = ops(args.device)
        _write(args.json, rows)
        for r in rows:
            print(f"{'ok ' if r['ok'] else 'OFF'} {r['op']:<45} max rel. error {r['max_rel_error']:.2e}")
        return 0 if all(r["ok"] for r in rows) else 1
    if args.cmd == "train":
        rows = train(args.device, args.steps, args.models)
        _write(args.json, rows)
        for r in rows:
            print(f"{'ok ' if r['ok'] else 'BAD'} {r['model']:<20} losses {r['losses']} {r.get('error', '')}")
        return 0 if all(r["ok"] for r in rows) else 1
    return report(args.stages, args.ops, args.bench, args.train, args.json)


if __name__ == "__main__":
    sys.exit(main())
