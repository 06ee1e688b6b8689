"""Builds crowdkernels._C: the C++ (CPU, OpenMP) kernels always, the CUDA kernels too when the installed
torch has CUDA and nvcc is found. CROWDKERNELS_CUDA=0/1 forces the choice. The GPU architectures are
`cuda_arch_flags`'s choice: TORCH_CUDA_ARCH_LIST, else the visible GPUs, else sm_80 and sm_90 (+PTX), never
one that this nvcc cannot build (nvcc 13 dropped everything below sm_75, sm_70 included).

torch must already be installed: build with `pip install --no-build-isolation .`. A plain `pip install .`
would build inside an isolated environment, where pip would fetch a second, multi-gigabyte torch; we stop
at once instead.
"""
import glob
import os
import re
import subprocess
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


# TORCH_CUDA_ARCH_LIST's names, as torch.utils.cpp_extension spells them (combined names first).
_NAMED_ARCHES = {
    "Kepler+Tesla": "3.7", "Kepler": "3.5+PTX", "Maxwell+Tegra": "5.3", "Maxwell": "5.0;5.2+PTX",
    "Pascal": "6.0;6.1+PTX", "Volta+Tegra": "7.2", "Volta": "7.0+PTX", "Turing": "7.5+PTX",
    "Ampere+Tegra": "8.7", "Ampere": "8.0;8.6+PTX", "Ada": "8.9+PTX", "Hopper": "9.0+PTX",
    "Blackwell+Tegra": "11.0", "Blackwell": "10.0;10.3;12.0;12.1+PTX",
}
DEFAULT_ARCHES = "8.0;9.0+PTX"  # no list and no visible GPU: A100 and H100/H200, PTX for later GPUs


def nvcc_sm_list(nvcc: str) -> set:
    """The sm_XX numbers `nvcc --list-gpu-code` can build (e.g. {75, 80, 86, ..., 121} for nvcc 13.0), or an
    empty set when nvcc cannot say."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {int(n) for n in re.findall(r"sm_(\d+)", out)}


def cuda_arch_flags(arch_list, visible, supported):
    """nvcc's -gencode flags for `arch_list` (TORCH_CUDA_ARCH_LIST's value: "8.0;9.0+PTX", names such as
    "Hopper", "native"; None or "" for automatic), given the compute capabilities of the visible GPUs
    (`visible`, [(9, 0), ...]) and the sm numbers this nvcc can build (`supported`; empty: unknown, nothing is
    left out). Returns (flags, notes): architectures nvcc cannot build are left out, each with a note saying
    so (nvcc 13 rejects sm_70, which torch's own choice would pass it); a GPU newer than nvcc is built as
    nvcc's newest architecture plus PTX. Raises ValueError for a malformed list or when nothing is left."""
    notes = []
    source = "TORCH_CUDA_ARCH_LIST"
    text = (arch_list or "").strip()
    if text in ("", "native"):
        if visible:
            text = ";".join(f"{major}.{minor}" for major, minor in sorted(set(visible)))
            text += "+PTX"
            source = "the visible GPU(s)"
        elif text == "native":
            raise ValueError("TORCH_CUDA_ARCH_LIST=native but no GPU is visible")
        else:
            text, source = DEFAULT_ARCHES, "the default list"
    for name, value in _NAMED_ARCHES.items():
        text = text.replace(name, value)
    newest = max(supported) if supported else None
    flags = []
    for entry in [e for e in re.split(r"[;\s]+", text) if e]:
        m = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", entry)
        if not m:
            raise ValueError(f"{source}: {entry!r} is not a CUDA architecture such as 8.0, 9.0a or 9.0+PTX "
                             f"(in {arch_list!r})")
        sm, suffix, ptx = int(m.group(1) + m.group(2)), m.group(3), bool(m.group(4))
        if supported and sm not in supported:
            if newest is not None and sm > newest and source == "the visible GPU(s)":
                notes.append(f"the visible GPU is sm_{sm}, newer than this nvcc builds: building sm_{newest} "
                             f"with PTX, which the driver compiles for it")
                sm, suffix, ptx = newest, "", True
            else:
                notes.append(f"{source} asks for sm_{sm}, which this nvcc cannot build (it builds sm_"
                             f"{', sm_'.join(str(s) for s in sorted(supported))}): left out")
                continue
        flags.append(f"-gencode=arch=compute_{sm}{suffix},code=sm_{sm}{suffix}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{sm},code=compute_{sm}")
    if not flags:
        raise ValueError(f"no CUDA architecture left to build for ({'; '.join(notes)}): set TORCH_CUDA_ARCH_LIST "
                         f"to architectures this nvcc supports, or CROWDKERNELS_CUDA=0 for a CPU-only build")
    return sorted(set(flags)), notes


def _cuda_arch_flags():
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    visible = [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())]
    try:
        flags, notes = cuda_arch_flags(os.environ.get("TORCH_CUDA_ARCH_LIST"), visible, nvcc_sm_list(nvcc))
    except ValueError as exc:
        sys.exit(f"crowdkernels: {exc}")
    for note in notes:
        print(f"crowdkernels: {note}", file=sys.stderr)
    return flags


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
        # Our own -gencode flags (torch adds none when the nvcc flags already name an arch), recorded in the
        # binary so that crowdkernels.backends() reports what was really compiled.
        gencode = _cuda_arch_flags()
        archs = ",".join(sorted(set(re.findall(r"code=((?:sm|compute)_\d+[af]?)", ";".join(gencode)))))
        defs = ["-DCK_WITH_CUDA", f'-DCK_CUDA_ARCHS="{archs}"']
        nvcc = ["-O3", "-std=c++17", "-DNDEBUG"] + gencode
        kwargs["extra_compile_args"] = {"cxx": cxx + defs, "nvcc": nvcc + defs}
        return [cpp_extension.CUDAExtension(**kwargs)]
    kwargs["extra_compile_args"] = {"cxx": cxx}
    return [cpp_extension.CppExtension(**kwargs)]


if __name__ == "__main__":  # pip's build backend runs this file as __main__; tests import its functions
    setup(
        ext_modules=extensions(),
        cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    )
