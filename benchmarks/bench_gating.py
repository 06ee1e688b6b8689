"""hierarchical_gating (HMoDE eq. 1) forward+backward against the eager composition of the released code.

Shapes (the released model's): batch 8, experts at 1/4, 1/8 and 1/16 of a 512x512 image (128, 64, 32),
gate logits at 1/16 (32x32, the encoder's last stage), K = 3, N = 2, outputs at 512x512 and 128x128.
The eager baseline does what HMoDE.py does: nearest-upsample every expert and every softmaxed weight map to
the output size, multiply, sum (plus the importance sums the losses need).

Peak memory:
- CPU: the growth of the process's peak resident set (VmHWM of /proc/self/status, reset through
  /proc/self/clear_refs; not ru_maxrss, which a child inherits from its parent) over one forward+backward
  run in a fresh subprocess, measured after the inputs exist and after a warm-up at a tiny size (so that
  library loading is not counted), with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave the
  resident set. tracemalloc cannot see torch's allocations, and the torch profiler's
  memory events do not give a reliable peak for CPU tensors here; RSS counts every page written, the C++
  kernels' scratch included (it is allocated through torch's allocator).
- GPU: torch.cuda.max_memory_allocated over the run, minus the memory in use before it.
The GPU variant also reports the effective bandwidth: bytes of the inputs read once plus the outputs written
once (forward: experts, logits -> final, group maps, importance; backward: the same inputs and the output
gradients -> input gradients), divided by the median time.

    PYTHONPATH=$PWD pytest benchmarks/bench_gating.py                       # timings
    PYTHONPATH=$PWD pytest benchmarks/bench_gating.py --benchmark-disable   # check mode, smaller shapes
"""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import crowdkernels as ck
from conftest import paired_ratio

EXPERT_SIZES = (128, 64, 32)
GATE_SIZE = 32
OUTPUTS = (512, 128)


def make_inputs(B, scale=1, device="cpu", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    experts = [torch.rand(B, 1, s // scale, s // scale, generator=gen).to(device, dtype).requires_grad_()
               for s in EXPERT_SIZES]
    g = GATE_SIZE // scale
    g1 = torch.randn(B, 6, g, g, generator=gen).to(device, dtype).requires_grad_()
    g2 = torch.randn(B, 3, g, g, generator=gen).to(device, dtype).requires_grad_()
    return experts, g1, g2


def eager(experts, g1, g2, size):
    """The released HMoDE.py composition, K = 3, N = 2 (softmax at gate resolution, then upsampling)."""
    up = lambda t: F.interpolate(t, size=size, mode="nearest")  # noqa: E731
    E = [up(e) for e in experts]
    wmaps = [up(F.softmax(g1[:, 2 * i:2 * i + 2], dim=1)) for i in range(3)]
    groups = [torch.sum(torch.cat([E[a], E[b]], 1) * w, 1, keepdim=True)
              for (a, b), w in zip(itertools.combinations(range(3), 2), wmaps)]
    group_maps = torch.cat(groups, 1)
    final = torch.sum(group_maps * up(F.softmax(g2, dim=1)), 1, keepdim=True)
    importance = torch.stack([w.sum((-2, -1)) for w in wmaps], 1)
    return final, group_maps, importance


def fused(experts, g1, g2, size):
    return ck.hierarchical_gating(experts, g1, g2, size=size)


IMPLS = {"eager": eager, "fused": fused}
# (impl, output size) -> timed rounds, about 3 s each here (eager ~6 and ~100 ms a step, fused ~1.5 and ~15)
ROUNDS = {("eager", 128): 500, ("fused", 128): 2000, ("eager", 512): 30, ("fused", 512): 200}


def step(impl, experts, g1, g2, size):
    """Forward + backward of a loss touching all three outputs, as HMoDE's criterion does."""
    final, group_maps, importance = IMPLS[impl](experts, g1, g2, size)
    loss = final.sum() + 0.1 * group_maps.sum() + importance.var(-1).sum()
    loss.backward()
    for t in (*experts, g1, g2):
        t.grad = None


def _peak_rss_subprocess(impl, B, out, scale):
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(ck.__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    # Every allocation over 64 KiB gets its own mmap, returned to the system when freed, so the resident set
    # follows the live tensors instead of a heap that keeps freed pages (which hid small runs' growth).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    res = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--peak", impl, str(B), str(out), str(scale)],
        capture_output=True, text=True, env=env, check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])["peak_bytes"]


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_main(impl, B, out, scale):
    torch.manual_seed(0)
    tiny = make_inputs(1, scale=8)
    step(impl, *tiny, (out // 8, out // 8))  # load libraries, warm the kernels, without touching big pages
    inputs = make_inputs(B, scale)
    before = _status_kib("VmRSS")
    try:  # reset the high-water mark to the current RSS (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        before = _status_kib("VmHWM")  # then only growth beyond the warm-up's peak is seen
    step(impl, *inputs, (out, out))
    after = _status_kib("VmHWM")
    print(json.dumps({"peak_bytes": max(after - before, 0) * 1024}))


def _shape(benchmark, out):
    # Check mode (--benchmark-disable) runs each case once at a quarter of the size: B=2, outputs /4.
    return (2, out // 4, 4) if benchmark.disabled else (8, out, 1)


@pytest.mark.parametrize("out", OUTPUTS)
@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_cpu_forward_backward(benchmark, impl, out):
    B, size, scale = _shape(benchmark, out)
    size = max(size, EXPERT_SIZES[0] // scale)
    inputs = make_inputs(B, scale)
    benchmark.group = f"gating cpu fwd+bwd B={B} out={size}x{size}"
    benchmark.extra_info["threads"] = torch.get_num_threads()
    # This VM has slow spells of several seconds (everything 1.5-2x slower): each side takes rounds enough
    # to span about 3 s, so that both sample the same mix of spells and one spell cannot decide a median.
    rounds = 1 if benchmark.disabled else ROUNDS[impl, out]
    benchmark.pedantic(step, args=(impl, *inputs, (size, size)), rounds=rounds,
                       warmup_rounds=0 if benchmark.disabled else 3)
    if not benchmark.disabled:
        peak = _peak_rss_subprocess(impl, B, size, scale)
        benchmark.extra_info["peak_rss_growth_MiB"] = round(peak / 2**20, 1)
        if impl == "fused":  # eager and fused steps timed side by side (about 3 s)
            pairs = 200 if out <= 128 else 20
            benchmark.extra_info["paired_ratio"] = round(paired_ratio(
                lambda: step("eager", *inputs, (size, size)), lambda: step("fused", *inputs, (size, size)),
                pairs=pairs, kernel_reps=5), 1)


@pytest.mark.parametrize("out", OUTPUTS)
def test_cpu_peak_memory_ratio(benchmark, out):
    """Target: the fused op's peak memory <= 1/3 of eager's (measured in subprocesses, see module doc)."""
    # Always at the full shape, check mode included: a fresh subprocess per implementation takes ~5 s.
    B, size, scale = 8, out, 1
    benchmark.group = f"gating cpu peak memory B={B} out={size}x{size}"
    peaks = {impl: _peak_rss_subprocess(impl, B, size, scale) for impl in IMPLS}
    benchmark.extra_info.update({f"{k}_peak_MiB": round(v / 2**20, 1) for k, v in peaks.items()})
    benchmark.pedantic(lambda: None, rounds=1)
    print(f"\nout={size}: peak RSS growth eager {peaks['eager'] / 2**20:.1f} MiB, fused {peaks['fused'] / 2**20:.1f} MiB")
    assert peaks["eager"] > 0, "the measurement saw no growth at all: it is broken"
    assert peaks["fused"] <= peaks["eager"] / 3


def _io_bytes(experts, g1, g2, size):
    """Bytes read and written once by forward + backward: inputs + outputs, then inputs + output grads +
    input grads."""
    B = g1.shape[0]
    el = g1.element_size()
    inputs = sum(e.numel() for e in experts) + g1.numel() + g2.numel()
    outputs = B * (1 + 3) * size[0] * size[1] + B * 6
    return el * (inputs + outputs + inputs + outputs + inputs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out", OUTPUTS)
@pytest.mark.parametrize("impl", ["eager", "fused"])
def test_cuda_forward_backward(benchmark, impl, out, dtype):
    B = 8
    inputs = make_inputs(B, device="cuda", dtype=dtype)
    size = (out, out)
    benchmark.group = f"gating cuda fwd+bwd B={B} out={out} {dtype}"

    def run():
        step(impl, *inputs, size)
        torch.cuda.synchronize()

    run()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    benchmark.extra_info["peak_MiB"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    benchmark.pedantic(run, rounds=1 if benchmark.disabled else 50, warmup_rounds=0 if benchmark.disabled else 5)
    if not benchmark.disabled:
        seconds = benchmark.stats.stats.median
        benchmark.extra_info["effective_GBps"] = round(_io_bytes(*inputs, size) / seconds / 1e9, 1)


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "--peak":
    _peak_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
