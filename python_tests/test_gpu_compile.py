"""Every Triton kernel compiled ahead of time for real GPUs (sm_80 and sm_90), at every configuration the ops
can launch, without a GPU (`crowdkernels.ops.triton.aot`): a compile error, a spill or an unpinned option
fails here. The interpreter tests (TRITON_INTERPRET=1) check what the kernels compute; these check that the
same source builds for the GPU, as the GPU would build it.

The compilation runs once, in a subprocess without TRITON_INTERPRET (under the interpreter `triton.jit` makes
interpreted functions, which cannot be compiled), two processes wide.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import crowdkernels


def _triton_version():
    if importlib.util.find_spec("triton") is None:
        return None
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())


pytestmark = [
    pytest.mark.gpu_compile,
    pytest.mark.skipif(_triton_version() is None, reason="Triton is not installed"),
    # The driver uses Triton's compiler internals (binder, _pack_args, knobs) as Triton 3.9 has them, the
    # version CI installs; other versions (a GPU machine's own Triton, say) compile through their own launches.
    pytest.mark.skipif((_triton_version() or (0,)) < (3, 9), reason="the ahead-of-time driver needs Triton >= 3.9"),
]

PACKAGE_ROOT = str(pathlib.Path(crowdkernels.__file__).resolve().parents[1])
TYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _compile_env(tmp):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the crowdkernels these tests import, not another one on the path; a private Triton cache
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("aot")
    out = tmp / "aot.json"
    res = subprocess.run(
        [sys.executable, "-m", "crowdkernels.ops.triton.aot", "--json", str(out), "--jobs", "2"],
        env=_compile_env(tmp), capture_output=True, text=True, timeout=1200, cwd=tmp,
    )
    assert out.exists(), f"the compilation driver wrote no report (exit {res.returncode}):\n{res.stderr[-4000:]}"
    data = json.loads(out.read_text())
    data["returncode"], data["stderr"] = res.returncode, res.stderr
    return data


def _unspecialized(obj):
    """(arguments not specialized on their values, arguments not specialized on alignment) of a Triton
    function, compiled (JITFunction) or interpreted (under TRITON_INTERPRET=1); None for anything else."""
    kind = type(obj).__name__
    if kind == "JITFunction":
        return ([p.name for p in obj.params if p.do_not_specialize],
                [p.name for p in obj.params if p.do_not_specialize_on_alignment])
    if kind == "InterpretedFunction":
        kw = obj.kwargs
        return list(kw.get("do_not_specialize") or []), list(kw.get("do_not_specialize_on_alignment") or [])
    return None


def _kernels():
    """Every kernel of the Triton modules: the `_launch.jit` functions (the ones launched; the helpers they
    call are plain `triton.jit` functions, compiled into them)."""
    from crowdkernels.ops.triton import gating, local_count

    return {name: obj for module in (gating, local_count) for name, obj in vars(module).items()
            if (_unspecialized(obj) or ([], []))[0]}


def test_every_configuration_compiles_for_sm80_and_sm90(report):
    errors = [f"{r['kernel']} [{r['config']}] {r['arch']}: {r['error']}" for r in report["results"] if "error" in r]
    assert not errors, "\n".join(errors)
    assert report["returncode"] == 0, report["stderr"][-4000:]
    assert report["targets"] == ["sm_80", "sm_90"]
    assert len(report["results"]) == 2 * report["launches"]


def test_the_compiled_launches_are_every_configuration_of_the_ops(report):
    """Read back from each compiled signature: every configuration the ops accept is there once per target,
    and nothing else. The expected set is built from what the ops accept (the public dtypes on CUDA, both
    upsampling modes, every BLOCK `forward_block` can return), not from the modules' CONFIGURATIONS lists
    that the driver walks, so a list that forgets a case fails here."""
    from crowdkernels.ops import gating as gating_ops
    from crowdkernels.ops.triton import gating, local_count

    blocks = {local_count.forward_block(h, w) for h in range(1, 80) for w in range(1, 80)}
    blocks |= {local_count.forward_block(h, w) for h in (1, 512, 4096, 2**15) for w in (1, 3, 4096, 2**15)}
    want = set()
    for dtype in gating_ops._GPU_DTYPES:
        for bilinear in (False, True):
            for kernel in ("_gating_fwd_kernel", "_gating_bwd_kernel"):
                want.add((kernel, TYPES[dtype], (("BILINEAR", str(bilinear)), ("BLOCK", str(gating._BLOCK)))))
    for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):  # local_counts' documented dtypes
        fp64 = ("ACC_FP64", str(dtype == torch.float64))
        want |= {("_local_counts_fwd", TYPES[dtype], (fp64, ("BLOCK", str(b)))) for b in blocks}
        want.add(("_local_counts_bwd", TYPES[dtype], (fp64, ("BLOCK", str(local_count.BACKWARD_BLOCK)))))
    for arch in ("sm_80", "sm_90"):
        got = []
        for r in report["results"]:
            if r["arch"] != arch:
                continue
            first_pointer = r["signature"].split(", ")[0].split(":*")[1]
            constexprs = tuple(sorted((k, v) for k, v in r["constexprs"].items() if k != "ACC"))
            got.append((r["kernel"], first_pointer, constexprs))
        assert len(got) == len(set(got)), f"a configuration was compiled twice for {arch}"
        assert set(got) == want, f"{arch}: missing {want - set(got)}, unexpected {set(got) - want}"
    # Every launched kernel of the modules is in the report.
    assert {r["kernel"] for r in report["results"]} == set(_kernels())


def test_no_kernel_spills_registers(report):
    heavy = [f"{r['kernel']} [{r['config']}] {r['arch']}: {r['registers']} registers, spills "
             f"{r['spill_stores']}/{r['spill_loads']} B, stack {r['stack_frame']} B"
             for r in report["results"]
             if "error" not in r and (r["spill_stores"] or r["spill_loads"] or r["stack_frame"])]
    assert not heavy, "\n".join(heavy)
    assert all(0 < r["registers"] <= 255 for r in report["results"])


def test_the_launch_options_are_pinned(report):
    """enable_fp_fusion=False (what the interpreter computes is what the GPU computes: no FMA contraction)
    and num_warps=4, in every compiled kernel."""
    from crowdkernels.ops.triton import _launch

    assert _launch.LAUNCH_OPTIONS == {"num_warps": 4, "enable_fp_fusion": False}
    assert all(r["enable_fp_fusion"] is False and r["num_warps"] == 4 for r in report["results"])


def test_kernels_have_no_value_specializations():
    """Each kernel's runtime arguments are neither specialized on their values nor on alignment, so one
    compiled variant serves every size: the configurations above are all the GPU will ever compile."""
    kernels = _kernels()
    assert set(kernels) == {"_gating_fwd_kernel", "_gating_bwd_kernel", "_local_counts_fwd", "_local_counts_bwd"}
    for name, kernel in kernels.items():
        params = inspect.signature(kernel.fn).parameters
        runtime = [n for n, p in params.items() if "constexpr" not in str(p.annotation)]
        assert _unspecialized(kernel) == (runtime, runtime), name


BROKEN = '''
import triton
import triton.language as tl


@triton.jit
def broken(X, N, BLOCK: tl.constexpr):
    # The interpreter runs this (Python lets acc change type); the compiler refuses a loop-carried value
    # whose type changes.
    acc = 0
    for i in range(N):
        acc += tl.load(X + i)
    tl.store(X + tl.arange(0, BLOCK), acc)
'''


def test_a_compile_error_fails(tmp_path):
    """A kernel that the interpreter runs but the compiler rejects: the driver reports it and exits 1."""
    (tmp_path / "broken_kernel.py").write_text(textwrap.dedent(BROKEN))
    script = textwrap.dedent('''
        import sys, torch
        from crowdkernels.ops.triton import aot
        launch = aot.Launch("broken_kernel", "broken", "float32", [aot._describe(torch.zeros(4)), ("value", 3)],
                            {"BLOCK": ("value", 4), "num_warps": ("value", 4)})
        aot.record_launches = lambda: [launch]
        sys.exit(aot.main([]))
    ''')
    env = _compile_env(tmp_path)
    env["PYTHONPATH"] = str(tmp_path) + os.pathsep + env["PYTHONPATH"]
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert res.returncode == 1, res.stderr[-3000:]
    assert "FAILED broken [float32] sm_80" in res.stderr and "FAILED broken [float32] sm_90" in res.stderr
    assert "0 of 2 compilations passed" in res.stderr
