"""One HMoDE training step (forward, eq. 7 criterion with REL, backward), the paper variant at full width:
crowdkernels' ops (hierarchical_gating, local_counts under REL) against the same model composed from the
plain-PyTorch references in `crowdkernels.ops.reference`. CPU: batch 4 of 256x256; GPU: batch 8 of 512x512.
Time per step, and peak memory (CUDA: max_memory_allocated; CPU: the step's peak RSS growth, measured in a
fresh subprocess so that the two compositions do not share a high-water mark).

    PYTHONPATH=. python -m pytest benchmarks/bench_models.py --benchmark-group-by=group
    PYTHONPATH=. python -m pytest benchmarks/bench_models.py --benchmark-disable     # check mode: tiny, < 60 s
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import crowdkernels as ck
from crowdkernels.models import hmode as hmode_module
from crowdkernels.ops import reference
from crowdkernels.ops.gating import GatingOutput

CONFIGS = {
    "cpu": dict(batch=4, size=256, width=1.0),
    "cuda": dict(batch=8, size=512, width=1.0),
    "check": dict(batch=2, size=64, width=0.125),
}


def reference_gating(experts, gate1_logits, gate2_logits, groups=None, size=None, upsample="nearest"):
    return GatingOutput(*reference.hierarchical_gating(list(experts), gate1_logits, gate2_logits, groups, size,
                                                       upsample))


def reference_rel(pred, target, region=0.125, num_hard=9, num_sublists=3, pairs="adjacent", edge="keep",
                  reduction="mean"):
    H, W = pred.shape[-2:]
    rh, rw = math.ceil(H * region), math.ceil(W * region)
    counts = reference.local_counts(pred[:, 0], target[:, 0], rh, rw, edge == "keep")
    per_image = reference.relative_local_count_loss(*counts, num_hard, num_sublists, pairs)
    return per_image.mean() if reduction == "mean" else per_image.sum()


@contextlib.contextmanager
def composed_from(impl: str):
    """impl="crowdkernels": as shipped; impl="reference": the model's ops swapped for the references."""
    if impl == "crowdkernels":
        yield
        return
    saved = hmode_module.hierarchical_gating, hmode_module.relative_local_count_loss
    hmode_module.hierarchical_gating, hmode_module.relative_local_count_loss = reference_gating, reference_rel
    try:
        yield
    finally:
        hmode_module.hierarchical_gating, hmode_module.relative_local_count_loss = saved


def make_step(device: str, batch: int, size: int, width: float):
    torch.manual_seed(0)
    model = ck.HMoDE(width=width).to(device).train()
    crit = model.criterion()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    points = [torch.rand(int(n), 2, generator=g) * (size - 1) for n in torch.randint(50, 400, (batch,), generator=g)]
    targets = {"density": ck.density_maps(points, (size, size)).to(device), "points": [p.to(device) for p in points]}

    def step():
        model.zero_grad(set_to_none=True)
        loss = crit(model(images), targets)["total"]
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return loss

    return step, model


def _peak_memory_mb(impl: str, device: str, cfg: dict) -> float:
    if device == "cuda":
        step, _ = make_step(device, **cfg)
        with composed_from(impl):
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    code = (
        "import json, os, resource, sys\n"
        "import bench_models as b\n"
        f"step, _ = b.make_step('cpu', **{cfg!r})\n"
        "rss = int(open('/proc/self/statm').read().split()[1]) * os.sysconf('SC_PAGE_SIZE')\n"
        f"with b.composed_from({impl!r}):\n"
        "    step()\n"
        "print(json.dumps({'growth': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss}))\n"
    )
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([repo, os.path.join(repo, "benchmarks"), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["growth"] / 2**20


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("impl", ["crowdkernels", "reference"])
@pytest.mark.parametrize("device", DEVICES)
def test_hmode_training_step(benchmark, device, impl):
    cfg = CONFIGS["check"] if benchmark.disabled else CONFIGS[device]
    benchmark.group = f"HMoDE step {device} B{cfg['batch']} {cfg['size']}x{cfg['size']} width {cfg['width']}"
    step, _ = make_step(device, **cfg)
    with composed_from(impl):
        loss = step()                                            # warm-up (and the check-mode run)
        assert torch.isfinite(loss)
        if not benchmark.disabled:
            benchmark.extra_info["peak_memory_MiB"] = round(_peak_memory_mb(impl, device, cfg), 1)
            benchmark.pedantic(step, rounds=3, iterations=1)
        else:
            benchmark(step)


def test_compositions_agree():
    """Both compositions compute the same loss and gradients, so the timings compare like with like."""
    results = []
    for impl in ("crowdkernels", "reference"):
        step, model = make_step("cpu", **CONFIGS["check"])
        with composed_from(impl):
            loss = step()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    # Norm-wise, against the whole gradient's scale: the two compositions sum in different orders, and
    # some gradients are round-off by nature (a conv bias feeding BatchNorm has a true gradient of 0),
    # so an elementwise tolerance would compare noise with noise.
    g0 = torch.cat([g.reshape(-1) for g in results[0][1]])
    g1 = torch.cat([g.reshape(-1) for g in results[1][1]])
    assert (g0 - g1).norm() <= 1e-5 * g1.norm()
    scale = g1.abs().max()
    for a, b in zip(results[0][1], results[1][1]):
        assert (a - b).abs().max() <= 1e-5 * scale
