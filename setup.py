"""Builds crowdkernels._C: the C++ (CPU, OpenMP) kernels always, the CUDA kernels too when the installed
torch has CUDA and nvcc is found. CROWDKERNELS_CUDA=0/1 forces the choice.

torch must already be installed: build with `pip install --no-build-isolation .`. A plain `pip install .`
would build inside an isolated environment, where pip would fetch a second, multi-gigabyte torch; we stop
at once instead.
"""
import glob
import os
import re
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - exercised by a plain `pip install .`
    sys.exit(
        "crowdkernels: torch is not importable in this build environment; install torch first, then run "
        "`pip install --no-build-isolation .` (add --no-build-isolation)."
    )

HERE = os.path.dirname(os.path.abspath(__file__))


def _want_cuda() -> bool:
    forced = os.environ.get("CROWDKERNELS_CUDA", "").strip()
    have_nvcc = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    torch_cuda = torch.version.cuda is not None
    if forced == "0":
        return False
    if forced == "1":
        if not (torch_cuda and have_nvcc):
            sys.exit(
                "crowdkernels: CROWDKERNELS_CUDA=1 but "
                + ("this torch has no CUDA" if not torch_cuda else "nvcc was not found (set CUDA_HOME)")
            )
        return True
    if forced not in ("", "auto"):
        sys.exit(f"crowdkernels: CROWDKERNELS_CUDA must be 0, 1 or unset, got {forced!r}")
    return torch_cuda and have_nvcc


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", pattern), recursive=True))


def extensions():
    with_cuda = _want_cuda()
    sources = _sources("crowdkernels.cpp") + _sources("*/*_cpu.cpp")
    # -fno-trapping-math: no code here reads floating-point exception flags, and without it GCC will not
    # vectorize a loop holding a floating-point select (ck::exp_le0's range clamps, for one). It changes
    # no result: unlike -ffast-math it allows no reassociation and keeps NaN and signed-zero semantics.
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-fno-trapping-math", "-DNDEBUG"]
    kwargs = dict(
        name="crowdkernels._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        kwargs["sources"] = sources + _sources("*/*_cuda.cu")
        # Recorded in the binary so that crowdkernels.backends() reports what was really compiled.
        archs = ";".join(f for f in cpp_extension._get_cuda_arch_flags() if f.startswith("-gencode"))
        archs = ",".join(sorted(set(re.findall(r"(?:sm|compute)_\d+a?", archs)))) or "default"
        defs = ["-DCK_WITH_CUDA", f'-DCK_CUDA_ARCHS="{archs}"']
        nvcc = ["-O3", "-std=c++17", "-DNDEBUG"]
        kwargs["extra_compile_args"] = {"cxx": cxx + defs, "nvcc": nvcc + defs}
        return [cpp_extension.CUDAExtension(**kwargs)]
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return [cpp_extension.CppExtension(**kwargs)]


setup(
    ext_modules=extensions(),
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
