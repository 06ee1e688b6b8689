"""Ahead-of-time compilation of every Triton kernel of crowdkernels, at every configuration the ops can launch,
for real GPU targets (sm_80, sm_90), without a GPU: what `pytest -m gpu_compile` runs, and where the register,
shared-memory and spill figures of `benchmarks/RESULTS.md` come from.

The launches are not written out by hand: `record_launches` calls the Triton ops themselves on small CPU
tensors, once per entry of each module's `CONFIGURATIONS`, with `_launch.launch` replaced by a recorder. So
what is compiled is what the ops pass (kernel, argument dtypes, constexprs, launch options). Triton's own
binder then turns each recorded call into the signature, constants and attributes a GPU launch would compile
(no value specializations: see `_launch.jit`), and `triton.compile` builds it for a `GPUTarget`, down to a
cubin through the ptxas that Triton ships; ptxas's `-v` report gives registers, spills and stack frame.

    python -m crowdkernels.ops.triton.aot [--json PATH] [--table] [--jobs N]

needs Triton and must run with TRITON_INTERPRET unset (under the interpreter `triton.jit` makes no compilable
kernels); it exits non-zero if any configuration fails to compile.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

TARGETS = (80, 90)  # compute capabilities: sm_80 (A100), sm_90 (H100/H200)


@dataclass
class Launch:
    """One recorded launch: the kernel's module (import path) and name, the configuration (an entry of the
    module's CONFIGURATIONS, as text), the call's arguments (tensors replaced by their dtypes), its
    constexprs and launch options."""

    module: str
    kernel: str
    config: str
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)


def _describe(value):
    """A picklable stand-in for a launch argument: ("tensor", dtype name) or the value itself."""
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype).replace("torch.", ""))
    if isinstance(value, tl.dtype):
        return ("tl_dtype", str(value))
    return ("value", value)


def _restore(desc):
    import triton.language as tl

    kind, value = desc
    if kind == "tensor":
        return torch.empty(4, dtype=getattr(torch, value))
    if kind == "tl_dtype":
        names = {"fp32": "float32", "fp64": "float64", "fp16": "float16", "bf16": "bfloat16"}
        return getattr(tl, names.get(value, value))
    return value


@contextlib.contextmanager
def _recording(out: list, config: str):
    from . import _launch

    def record(kernel, grid, device, *args, **constexprs):
        out.append(Launch(kernel.__module__, kernel.__name__, config, [_describe(a) for a in args],
                          {k: _describe(v) for k, v in {**constexprs, **_launch.LAUNCH_OPTIONS}.items()}))

    real = _launch.launch
    _launch.launch = record
    try:
        yield
    finally:
        _launch.launch = real


def record_launches() -> list[Launch]:
    """Every (kernel, configuration) the Triton ops can launch, recorded from the ops themselves."""
    from . import gating as tg
    from . import local_count as tlc

    launches: list[Launch] = []
    for dtype, bilinear in tg.CONFIGURATIONS:
        config = f"{str(dtype)[6:]} {'bilinear' if bilinear else 'nearest'}"
        experts = torch.zeros(2 * (6 * 5 + 3 * 3 + 2 * 2), dtype=dtype)
        sizes = [6, 5, 3, 3, 2, 2]
        groups = torch.tensor(list(itertools.combinations(range(3), 2)))
        g1 = torch.zeros(2, 6, 3, 3, dtype=dtype)
        g2 = torch.zeros(2, 3, 2, 2, dtype=dtype)
        grads = (torch.zeros(2, 1, 13, 11, dtype=dtype), torch.zeros(2, 3, 13, 11, dtype=dtype),
                 torch.zeros(2, 3, 2, dtype=dtype))
        with _recording(launches, config):
            tg.gating_forward_triton(experts, sizes, g1, g2, groups, 13, 11, bilinear)
            tg.gating_backward_triton(*grads, experts, sizes, g1, g2, groups, 13, 11, bilinear)
    for kind, dtype, block in tlc.CONFIGURATIONS:
        config = f"{str(dtype)[6:]} {kind} BLOCK={block}"
        # A window whose area the forward rounds to `block` (forward_block's choice).
        h, w = 8, block // 8
        assert tlc.forward_block(h, w) == block or kind == "backward"
        pred = torch.zeros(2, 2 * h, 2 * w + 1, dtype=dtype)
        with _recording(launches, config):
            if kind == "forward":
                tlc.local_counts_triton(pred, pred, h, w, True)
            else:
                g = torch.zeros(2, 6, dtype=dtype)
                tlc.local_counts_triton_backward(g, g, g, pred, pred, h, w, True, [True, True])
    return launches


def _ptxas_report(log: str) -> dict:
    def num(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    if "Used" not in log:
        raise RuntimeError(f"no resource report in the ptxas output:\n{log}")
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack_frame": num(r"(\d+) bytes stack frame")}


def compile_launch(launch: Launch, capability: int) -> dict:
    """Compiles one recorded launch for sm_<capability> and returns its resource use."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    if knobs.runtime.interpret:
        raise RuntimeError("TRITON_INTERPRET is set: the kernels are interpreted functions, not compilable")
    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    args = [_restore(a) for a in launch.args]
    kwargs = {k: _restore(v) for k, v in launch.kwargs.items()}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    start = time.perf_counter()
    knobs.compilation.always_compile = True  # a cached cubin would skip ptxas and its report
    knobs.nvidia.dump_ptxas_log = True  # Triton prints ptxas -v's report on stdout
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)
    seconds = time.perf_counter() - start
    return {
        "kernel": launch.kernel, "module": launch.module, "config": launch.config, "arch": f"sm_{capability}",
        "signature": ", ".join(f"{k}:{v}" for k, v in signature.items() if v != "constexpr"),
        "constexprs": {fn.arg_names[k[0]]: str(v) for k, v in constexprs.items()},
        "enable_fp_fusion": kernel.metadata.enable_fp_fusion, "num_warps": kernel.metadata.num_warps,
        "shared_bytes": kernel.metadata.shared, "compile_s": round(seconds, 2), **_ptxas_report(log.getvalue()),
    }


def _compile_one(job):
    launch, capability = job
    try:
        return compile_launch(launch, capability)
    except Exception as exc:  # reported per configuration; main() exits non-zero
        return {"kernel": launch.kernel, "module": launch.module, "config": launch.config,
                "arch": f"sm_{capability}", "error": f"{type(exc).__name__}: {exc}"}


def compile_all(jobs: int = 1) -> dict:
    """Records every launch and compiles each for every target: {"launches": n, "results": [...]}."""
    launches = record_launches()
    work = [(launch, cap) for launch in launches for cap in TARGETS]
    start = time.perf_counter()
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_one, work))
    else:
        results = [_compile_one(w) for w in work]
    return {"launches": len(launches), "targets": [f"sm_{c}" for c in TARGETS],
            "seconds": round(time.perf_counter() - start, 1), "results": results}


def table(report: dict) -> str:
    """Markdown: one row per (kernel, configuration), registers / spill stores+loads / stack / shared memory
    per target."""
    rows = {}
    for r in report["results"]:
        rows.setdefault((r["kernel"], r["config"]), {})[r["arch"]] = r
    archs = report["targets"]
    head = "| kernel | configuration | " + " | ".join(f"{a}: regs, spills (st/ld B), stack, smem" for a in archs) + " |"
    lines = [head, "|---|---|" + "---|" * len(archs)]
    for (kernel, config), per in rows.items():
        cells = []
        for a in archs:
            r = per.get(a, {})
            if "error" in r:
                cells.append("**compile error**")
            else:
                cells.append(f"{r['registers']}, {r['spill_stores']}/{r['spill_loads']}, {r['stack_frame']}, "
                             f"{r['shared_bytes']}")
        lines.append(f"| `{kernel}` | {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the full report here")
    parser.add_argument("--table", action="store_true", help="print a markdown table of the resources")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = parser.parse_args(argv)
    # A private cache: results must not depend on what an earlier run left in ~/.triton.
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="crowdkernels-aot-"))
    report = compile_all(args.jobs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    errors = [r for r in report["results"] if "error" in r]
    if args.table:
        print(table(report))
    for r in errors:
        print(f"FAILED {r['kernel']} [{r['config']}] {r['arch']}: {r['error']}", file=sys.stderr)
    print(f"{len(report['results']) - len(errors)} of {len(report['results'])} compilations passed "
          f"({report['launches']} configurations x {len(TARGETS)} targets) in {report['seconds']} s", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
