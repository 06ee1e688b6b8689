"""The one harness behind every benchmarks/bench_<op>.py, in the shape of Liger-Kernel's benchmark scripts:
an op declares its providers, a size sweep and an input builder (an `Op`); the harness runs every (size,
mode, provider) as one pytest-benchmark case, with its time, its peak memory and a check of its result, and
`ratios.py` turns the run's JSON into one table.

Modes, as Liger-Kernel's:
- "forward": one call of the provider, autograd recording (as in training);
- "backward": the backward pass of one recorded forward, replayed (retain_graph) at every round;
- "full": forward then backward.
The backward pass sends fixed gradients into every output that requires grad: N(0, 1) draws seeded per
output (so every provider of a case gets the same ones), and 1 for a scalar output (a loss).

Sweeps: `--benchmark-disable` (check mode, as CI runs it) takes each op's "check" sizes and runs every case
once, checks included; otherwise `--bench-sweep small|full` (default full; "full" holds the issues' shapes).

Time: rounds enough to fill `--benchmark-max-time` seconds (at least 3, or 1 when a call takes longer than
that), after one warm-up call that also measures the call; or the op's fixed count for a provider
(`Op.rounds`), after one warm-up round when it is more than 1. This VM has slow spells of seconds in which
a vCPU runs 1.5-2x slower whatever the code: on the CPU, ops whose targets are judged here take rounds
spanning several seconds (`Op.time_scale` x the max time), and a `paired` ratio (see `paired_ratio`).

Peak memory (extra_info["peak_MiB"], the growth over the memory in use before the measured call):
- CUDA: torch.cuda.max_memory_allocated over one call, minus the memory allocated before it.
- CPU: torch keeps no statistics of its CPU allocator, and tracemalloc cannot see its allocations. So the
  growth of the process's peak resident set over one call: VmHWM of /proc/self/status, reset to the current
  resident set through /proc/self/clear_refs ("5", Linux >= 4.0), read after the call. It is measured in a
  fresh subprocess per (op, device, dtype, size), after a warm-up at the op's check size (libraries loaded,
  lazy state built, no big page touched), with MALLOC_MMAP_THRESHOLD_=65536 so that every allocation over
  64 KiB is its own mapping, returned to the system when freed: the resident set then follows the live
  tensors instead of a heap that keeps freed pages, and crowdkernels' pool of CPU output buffers is emptied
  before each measurement. (Not in the timing process: the threshold would change what the timed calls
  cost.) RSS counts every page written, the C++ kernels' scratch included.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

import crowdkernels

MODES = ("forward", "backward", "full")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# the provider names that the table's two ratio columns divide by
REFERENCE = "reference"   # the plain-PyTorch oracle of crowdkernels/ops/reference.py
KERNEL = "crowdkernels"   # the op as shipped: the C++ kernel on the CPU, CUDA or Triton on a GPU
MAX_ROUNDS = 100_000

OPS: Dict[str, "Op"] = {}


@dataclasses.dataclass
class Op:
    """One benchmarked op: `providers` are callables over the tensors `build(x, device, dtype)` returns."""

    name: str                                   # the test is test_<name>; also the table's op column
    x_name: str                                 # what the sweep varies, e.g. "H=W"
    sweep: Dict[str, Sequence]                  # "check", "small", "full" -> x values
    build: Callable[[Any, str, torch.dtype], tuple]
    providers: Dict[str, Callable]
    describe: Optional[Callable[[Any], str]] = None            # the size column; default f"{x_name}={x}"
    modes: Tuple[str, ...] = MODES
    baseline: Union[str, Callable[[Any], str]] = REFERENCE     # the comparison (may depend on x)
    checks: Optional[Dict[str, str]] = None     # provider -> the provider it must agree with (default: reference)
    rtol: float = 1e-4
    atol: float = 1e-4
    available: Callable[[str, Any, str], bool] = lambda provider, x, device: True
    devices: Tuple[str, ...] = (DEVICE,)
    dtypes: Dict[str, Tuple[torch.dtype, ...]] = dataclasses.field(default_factory=dict)  # default float32
    time_scale: float = 1.0                     # on the CPU, each case is timed for this x the max time
    rounds: Dict[str, int] = dataclasses.field(default_factory=dict)  # fixed round counts per provider
    paired: Optional[Callable[[Any, str, str], Optional[Tuple[int, int]]]] = None  # (x, mode, device) -> (pairs, reps)
    extra_info: Optional[Callable[..., dict]] = None  # (x, mode, args, out, seconds) -> more extra_info

    def size(self, x) -> str:
        return self.describe(x) if self.describe else f"{self.x_name}={x}"

    def baseline_of(self, x) -> str:
        return self.baseline(x) if callable(self.baseline) else self.baseline

    def oracle_of(self, provider: str) -> Optional[str]:
        if self.checks is not None:
            return self.checks.get(provider)
        return REFERENCE if provider != REFERENCE and REFERENCE in self.providers else None

    def dtypes_on(self, device: str) -> Tuple[torch.dtype, ...]:
        return self.dtypes.get(device, (torch.float32,))

    def pairs_at(self, x, device: str):
        """The (mode, provider) pairs run at size x on `device`, in declaration order."""
        return [(m, p) for m in self.modes for p in self.providers if self.available(p, x, device)]


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    op: Op
    device: str
    dtype: torch.dtype
    x: Any
    mode: str
    provider: str
    seconds: float

    @property
    def id(self) -> str:
        return f"{self.device}-{_dtype_name(self.dtype)}-{self.x}-{self.mode}-{self.provider}"


def _dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def bench(op: Op):
    """The pytest test of `op`: benchmarks/conftest.py parametrizes its `case` over `cases(op, ...)`."""
    OPS[op.name] = op

    def test(benchmark, case):
        run_case(benchmark, case)

    test.__name__ = f"test_{op.name}"
    test.bench_op = op
    return test


def cases(op: Op, sweep: str, seconds: float):
    return [Case(op, device, dtype, x, mode, provider, seconds * (op.time_scale if device == "cpu" else 1.0))
            for device in op.devices for dtype in op.dtypes_on(device) for x in op.sweep[sweep]
            for mode, provider in op.pairs_at(x, device)]


# ------------------------------------------------------------------------------------------- running a case
def _tensors(obj):
    """The tensors in a provider's output or arguments, in order (tuples, lists, dicts, modules' parameters,
    NumPy arrays as tensors)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, np.ndarray):
        return [torch.from_numpy(obj)]
    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters())
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    return []


def _leaves(args):
    return [t for t in _tensors(args) if t.requires_grad and t.is_leaf]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Runner:
    """`run()` does one round of `mode` for `fn(*args)`; the forward's output shapes give the gradients."""

    def __init__(self, fn, args, mode: str, device: str):
        self.fn, self.args, self.mode, self.device = fn, args, mode, device
        self.leaves = _leaves(args)
        self.grads = None
        if mode != "forward":
            out = fn(*args)  # the backward's graph ("backward") or the gradients' shapes ("full")
            outs = _tensors(out)
            g = torch.Generator().manual_seed(0)
            grads = [torch.ones_like(t) if t.dim() == 0 else
                     torch.randn(t.shape, generator=g).to(t.device, t.dtype) for t in outs]
            keep = [i for i, t in enumerate(outs) if t.requires_grad]
            self.outs = [outs[i] for i in keep]
            self.grads = [grads[i] for i in keep]
            self.out = out if mode == "backward" else None

    def run(self):
        for t in self.leaves:
            t.grad = None
        if self.mode == "backward":
            torch.autograd.backward(self.outs, self.grads, retain_graph=True)
            _sync(self.device)
            return self.out
        out = self.fn(*self.args)
        if self.mode == "full":
            outs = [t for t in _tensors(out) if t.requires_grad]
            torch.autograd.backward(outs, self.grads)
        _sync(self.device)
        return out


def run_case(benchmark, case: Case) -> None:
    op = case.op
    args = op.build(case.x, case.device, case.dtype)
    runner = Runner(op.providers[case.provider], args, case.mode, case.device)
    benchmark.group = f"{op.name} {case.device} {op.size(case.x)} {_dtype_name(case.dtype)} {case.mode}"
    baseline = op.baseline_of(case.x)
    benchmark.extra_info.update(
        op=op.name, device=case.device, dtype=_dtype_name(case.dtype), x=case.x, size=op.size(case.x),
        mode=case.mode, provider=case.provider, order=list(op.providers).index(case.provider),
        baseline=case.provider == baseline, threads=torch.get_num_threads())
    if benchmark.disabled:
        out = benchmark(runner.run)
    else:
        rounds = op.rounds.get(case.provider)
        warmup = int(rounds is not None and rounds > 1)
        if rounds is None:
            t0 = time.perf_counter()
            runner.run()  # warm-up, and the length of a call
            once = time.perf_counter() - t0
            rounds = 1 if once >= case.seconds else min(MAX_ROUNDS, max(3, round(case.seconds / once)))
        out = benchmark.pedantic(runner.run, rounds=rounds, iterations=1, warmup_rounds=warmup)
        benchmark.extra_info["rounds"] = rounds
        benchmark.extra_info["peak_MiB"] = round(peak_memory(case, runner) / 2**20, 1)
        pairing = op.paired(case.x, case.mode, case.device) if op.paired else None
        if pairing and case.provider == KERNEL and baseline in op.providers and baseline != KERNEL:
            base = Runner(op.providers[baseline], op.build(case.x, case.device, case.dtype), case.mode, case.device)
            pairs, reps = pairing
            benchmark.extra_info["paired_ratio"] = round(paired_ratio(base.run, runner.run, pairs, reps), 1)
        if op.extra_info:
            benchmark.extra_info.update(op.extra_info(case.x, case.mode, args, out, benchmark.stats.stats.median))
    check(case, out, runner)


# ---------------------------------------------------------------------------------------------- checks
_ORACLE_CACHE: Dict[tuple, tuple] = {}


def _grads(runner):
    return [None if t.grad is None else t.grad.detach().clone() for t in runner.leaves]


def check(case: Case, out, runner: Runner) -> None:
    """The provider's output (forward, full) and its inputs' gradients (full) equal its oracle's, computed
    on the same inputs (the builder is seeded), to the op's rtol and atol x max(1, max |oracle|). Float32 and
    float64 only: other dtypes are timed only."""
    op = case.op
    oracle = op.oracle_of(case.provider)
    if (oracle is None or case.mode == "backward" or case.dtype not in (torch.float32, torch.float64)
            or not op.available(oracle, case.x, case.device)):
        return
    key = (op.name, case.device, case.dtype, case.x, case.mode, oracle)
    if key not in _ORACLE_CACHE:
        ref = Runner(op.providers[oracle], op.build(case.x, case.device, case.dtype), case.mode, case.device)
        ref_out = ref.run()
        _ORACLE_CACHE.clear()  # one oracle at a time: they can be large
        _ORACLE_CACHE[key] = ([t.detach() for t in _tensors(ref_out)], _grads(ref))
    want, want_grads = _ORACLE_CACHE[key]
    got = [t.detach() for t in _tensors(out)]
    assert len(got) == len(want), f"{case.provider} gives {len(got)} outputs, {oracle} {len(want)}"
    pairs = list(zip(got, want))
    if case.mode == "full":
        pairs += [(a, b) for a, b in zip(_grads(runner), want_grads) if a is not None and b is not None]
    for a, b in pairs:
        # atol is relative to the tensor's scale where that exceeds 1: a gradient summed over 32 x 32 output
        # pixels in float32 carries round-off in proportion to its size
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        torch.testing.assert_close(a.double().cpu(), b.double().cpu(), rtol=op.rtol, atol=op.atol * scale,
                                   msg=lambda m: f"{case.id}: {case.provider} against {oracle}: {m}")


# ---------------------------------------------------------------------------------------------- pairing
def timed_pair(baseline, kernel, kernel_reps: int) -> tuple[float, float]:
    """(seconds of one baseline call, mean seconds of a kernel call), timed side by side: `kernel_reps`
    kernel calls, half of them right before the baseline call and half right after it, so that the kernel
    samples the machine on both sides of the baseline. Means on both sides: a baseline call is one sample
    of its own mean, and a median of the kernel calls would drop the hiccups that the baseline keeps."""
    def kernel_block(reps: int) -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            kernel()
        return time.perf_counter() - t0

    before = kernel_block(kernel_reps // 2)
    t0 = time.perf_counter()
    baseline()
    tb = time.perf_counter() - t0
    after = kernel_block(kernel_reps - kernel_reps // 2)
    return tb, (before + after) / kernel_reps


def paired_ratio(baseline, kernel, pairs: int, kernel_reps: int) -> float:
    """The speed-up of `kernel` over `baseline`, timed side by side: the median over `pairs` pairs of
    (one baseline call) / (the mean kernel call around it, see timed_pair).

    This VM has slow spells lasting seconds in which each of its two vCPUs runs 1.5-2x slower, whatever the
    code (pure Python and L1-resident loops alike). Two benchmarks timed one after the other can fall on
    either side of a spell; a pair is timed within a second or so, so both halves see the same machine.
    Reported as extra_info["paired_ratio"] beside the usual medians.
    """
    return statistics.median(tb / tk for tb, tk in (timed_pair(baseline, kernel, kernel_reps) for _ in range(pairs)))


# ---------------------------------------------------------------------------------------------- memory
_PEAKS: Dict[tuple, Dict[str, int]] = {}


def peak_memory(case: Case, runner: Optional[Runner] = None) -> int:
    """Bytes: the peak growth of one round of `case` (see the module's docstring)."""
    if case.device == "cuda":
        if runner is None:
            runner = Runner(case.op.providers[case.provider], case.op.build(case.x, "cuda", case.dtype),
                            case.mode, "cuda")
        runner.run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        runner.run()
        return torch.cuda.max_memory_allocated() - base
    key = (case.op.name, case.device, case.dtype, case.x)
    if key not in _PEAKS:  # one subprocess measures every case of this size in turn
        _PEAKS[key] = peak_rss_subprocess(case.op, case.device, case.dtype, case.x,
                                          case.op.pairs_at(case.x, case.device))
    return _PEAKS[key][f"{case.mode}/{case.provider}"]


def peak_rss_subprocess(op: Op, device: str, dtype, x, pairs) -> Dict[str, int]:
    """{"mode/provider": bytes} for each (mode, provider) of `pairs`, measured in one fresh subprocess."""
    here = os.path.dirname(os.path.abspath(__file__))
    module = sys.modules[op.build.__module__].__file__
    # the crowdkernels this process runs (installed, or a source tree with its built _C), never a checkout's
    # unbuilt tree found through the working directory, where every op would run its reference
    package = os.path.dirname(os.path.dirname(os.path.abspath(crowdkernels.__file__)))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536",
               PYTHONPATH=os.pathsep.join([package, here, os.environ.get("PYTHONPATH", "")]))
    code = "import sys, harness; harness._peak_main(*sys.argv[1:])"
    res = subprocess.run([sys.executable, "-c", code, module, op.name, device, _dtype_name(dtype),
                          json.dumps(x), json.dumps(pairs)], capture_output=True, text=True, env=env, cwd=here)
    if res.returncode != 0:
        raise RuntimeError(f"the peak-memory subprocess of {op.name} at {x} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Resets the high-water mark to the current resident set; returns the KiB the growth is counted from."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_kib("VmRSS")
    except OSError:  # then only growth beyond the peak so far is seen
        return _status_kib("VmHWM")


def _peak_main(module_path, op_name, device, dtype_name, x_json, pairs_json) -> None:
    spec = importlib.util.spec_from_file_location(os.path.basename(module_path)[:-3], module_path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    op = OPS[op_name]
    dtype, x = getattr(torch, dtype_name), json.loads(x_json)
    small = op.sweep["check"][0]
    out = {}
    for mode, provider in json.loads(pairs_json):
        if op.available(provider, small, device):  # warm up without touching big pages
            Runner(op.providers[provider], op.build(small, device, dtype), mode, device).run()
        runner = Runner(op.providers[provider], op.build(x, device, dtype), mode, device)
        gc.collect()
        crowdkernels.empty_cache()  # the pool of CPU output buffers would lend the last case's pages to this one
        before = _reset_peak_rss()
        runner.run()
        out[f"{mode}/{provider}"] = max(_status_kib("VmHWM") - before, 0) * 1024
        del runner
        gc.collect()
    print(json.dumps(out))
