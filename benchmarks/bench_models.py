"""One HMoDE training step (forward, the eq. 7 criterion with REL, backward), the paper variant: crowdkernels'
ops (hierarchical_gating, local_counts under REL) against the same model composed from the plain-PyTorch
references in `crowdkernels.ops.reference`. The issue's shapes, at full width: CPU, batch 4 of 256x256; GPU,
batch 8 of 512x512 (smaller sizes at reduced width). "forward" is the model and its criterion, "backward"
the loss's backward pass.

    PYTHONPATH=. python -m pytest benchmarks/bench_models.py --benchmark-json=/tmp/m.json
    PYTHONPATH=. python -m pytest benchmarks/bench_models.py --benchmark-disable     # check mode: tiny
"""
from __future__ import annotations

import contextlib

import torch

import crowdkernels as ck
import harness
from bench_gating import reference_gating
from bench_losses import reference_rel
from crowdkernels.models import hmode as hmode_module

CONFIGS = {64: dict(batch=2, width=0.125), 128: dict(batch=2, width=0.25), 256: dict(batch=4, width=1.0),
           512: dict(batch=8, width=1.0)}
FULL = {"cpu": 256, "cuda": 512}


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


def build(size, device, dtype):
    batch, width = CONFIGS[size]["batch"], CONFIGS[size]["width"]
    torch.manual_seed(0)
    model = ck.HMoDE(width=width).to(device).train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    points = [torch.rand(int(n), 2, generator=g) * (size - 1) for n in torch.randint(50, 400, (batch,), generator=g)]
    targets = {"density": ck.density_maps(points, (size, size)).to(device), "points": [p.to(device) for p in points]}
    return model, model.criterion(), images, targets


def step_loss(impl):
    def loss(model, criterion, images, targets):
        with composed_from(impl):
            return criterion(model(images), targets)["total"]

    return loss


test_hmode_training_step = harness.bench(harness.Op(
    name="hmode_training_step", x_name="size", build=build,
    sweep={"check": [64], "small": [64, 128], "full": [256, 512]},
    providers={"crowdkernels": step_loss("crowdkernels"), "reference": step_loss("reference")},
    describe=lambda s: f"B={CONFIGS[s]['batch']} {s}x{s}, width {CONFIGS[s]['width']}",
    available=lambda provider, size, device: size < 256 or size == FULL[device],
    devices=("cpu", "cuda") if torch.cuda.is_available() else ("cpu",),
    checks={}, rounds={"crowdkernels": 3, "reference": 3},  # test_compositions_agree checks
))


def test_compositions_agree():
    """Both compositions compute the same loss and gradients, so the timings compare like with like."""
    results = []
    for impl in ("crowdkernels", "reference"):
        model, criterion, images, targets = build(64, "cpu", torch.float32)
        loss = step_loss(impl)(model, criterion, images, targets)
        loss.backward()
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
