"""The install and CI promises: the README's Quick start, .ci/run running its test command verbatim,
setup.py stopping at once without torch, and backends() reporting what was built."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import crowdkernels
from conftest import REPO


def _quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    m = re.search(r"^## Quick start\s*\n(.*?)^## ", readme, flags=re.S | re.M)
    assert m, "README.md must have a '## Quick start' section"
    blocks = re.findall(r"```bash\n(.*?)```", m.group(1), flags=re.S)
    assert len(blocks) == 1, "the Quick start is one bash block"
    return [ln for ln in blocks[0].splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def test_readme_opens_with_quick_start_of_two_commands():
    readme = (REPO / "README.md").read_text()
    first_section = re.search(r"^## (.+)$", readme, flags=re.M).group(1)
    assert first_section.strip() == "Quick start"
    demo, tests = _quick_start_commands()
    assert "crowdkernels demo" in demo
    assert "pytest" in tests and "TRITON_INTERPRET=1" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    _, tests = _quick_start_commands()
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert tests in ci, ".ci/run must run the README's test command verbatim"


def test_setup_py_stops_at_once_without_torch():
    """What a plain `pip install .` meets in its isolated build environment: no torch. setup.py must
    stop with one line that says to add --no-build-isolation (and never let pip fetch a torch)."""
    code = (
        "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name'];"
        f"exec(compile(open({str(REPO / 'setup.py')!r}).read(), 'setup.py', 'exec'))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert res.returncode != 0
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--no-build-isolation" in lines[0], res.stderr


def test_build_system_does_not_require_torch():
    text = (REPO / "pyproject.toml").read_text()
    requires = re.search(r"^requires\s*=\s*\[(.*?)\]", text, flags=re.M | re.S).group(1)
    assert "torch" not in requires
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, flags=re.M | re.S).group(1)
    spec = re.search(r'"torch([^"]*)"', deps).group(1)
    from packaging.specifiers import SpecifierSet

    assert "2.13.0" in SpecifierSet(spec), "the torch requirement must accept 2.13.0 (the local CPU wheel)"


def test_backends_report():
    b = crowdkernels.backends()
    for key in ("cpu", "openmp", "cuda", "cuda_archs", "cuda_device", "triton", "torch", "threads"):
        assert key in b
    assert b["torch"] == torch.__version__
    assert b["threads"] == torch.get_num_threads()
    if b["cpu"]:
        assert b["openmp"] > 0, "the C++ kernels are built with OpenMP"
    if not b["cuda"]:
        assert b["cuda_archs"] == []


@pytest.mark.skipif(not crowdkernels._ext.compiled(), reason="crowdkernels._C is not built")
def test_every_schema_has_a_cpu_kernel_or_a_triton_path():
    """A schema with no CPU kernel would send CPU users to the slow reference without telling them."""
    import crowdkernels.ops as ops  # noqa: F401

    names = [s.name for s in torch._C._jit_get_all_schemas() if s.name.startswith("crowdkernels::")]
    assert "crowdkernels::density_splat" in names
    for name in names:
        op = name.split("::")[1]
        if op.startswith("_"):
            continue
        if "triton" in op:  # torch.library.triton_op: one Python implementation for every device
            assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeExplicitAutograd"), name
            continue
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), f"{name} has no CPU kernel"


# ------------------------------------------------------------------ setup.py: which GPU architectures nvcc gets
NVCC13 = {75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121}  # `nvcc --list-gpu-code`, CUDA 13.0
NVCC12 = {50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90}


@pytest.fixture(scope="module")
def setup_py():
    """setup.py's globals, without running setup() (it only runs as __main__, as pip's backend runs it)."""
    import runpy

    return runpy.run_path(str(REPO / "setup.py"), run_name="crowdkernels_setup")


def _archs(flags):
    return sorted(re.findall(r"code=((?:sm|compute)_\d+a?)", " ".join(flags)))


@pytest.mark.parametrize("arch_list", ["7.0;8.0;9.0+PTX", "Volta;Hopper", "7.0 8.0 9.0+PTX"])
def test_setup_never_asks_nvcc13_for_sm70_and_says_so(setup_py, arch_list):
    flags, notes = setup_py["cuda_arch_flags"](arch_list, [], NVCC13)
    assert not any("_70" in f for f in flags)
    assert "sm_90" in _archs(flags) and "compute_90" in _archs(flags)
    assert len(notes) == 1 and "TORCH_CUDA_ARCH_LIST" in notes[0] and "sm_70" in notes[0]
    # the same list with an nvcc that still builds Volta keeps it
    flags, notes = setup_py["cuda_arch_flags"](arch_list, [], NVCC12)
    assert "sm_70" in _archs(flags) and notes == []


def test_setup_arch_choice_without_a_list(setup_py):
    choose = setup_py["cuda_arch_flags"]
    assert _archs(choose(None, [], NVCC13)[0]) == ["compute_90", "sm_80", "sm_90"]  # no GPU: the default
    assert _archs(choose("", [(9, 0)], NVCC13)[0]) == ["compute_90", "sm_90"]  # the visible H100/H200
    assert _archs(choose("native", [(8, 6), (9, 0), (8, 6)], NVCC13)[0]) == ["compute_90", "sm_86", "sm_90"]
    flags, notes = choose(None, [(12, 1)], NVCC12)  # a GPU newer than nvcc: its newest arch + PTX
    assert _archs(flags) == ["compute_90", "sm_90"] and "sm_121" in notes[0]
    with pytest.raises(ValueError, match="sm_70.*CROWDKERNELS_CUDA=0"):  # a V100 with nvcc 13: nothing left
        choose(None, [(7, 0)], NVCC13)
    with pytest.raises(ValueError, match="'banana'"):
        choose("8.0;banana", [], NVCC13)
    with pytest.raises(ValueError, match="native"):
        choose("native", [], NVCC13)


def test_setup_never_passes_an_arch_nvcc_cannot_build(setup_py):
    names = ["Kepler", "Maxwell", "Pascal", "Volta", "Turing", "Ampere", "Ada", "Hopper", "Blackwell", "9.0a", "10.0a"]
    for name in names:
        try:
            flags, _ = setup_py["cuda_arch_flags"](name + ";9.0", [], NVCC13)
        except ValueError:
            continue
        assert all(int(re.search(r"\d+", a).group()) in NVCC13 for a in _archs(flags)), (name, flags)


def test_setup_cuda_build_gets_our_arch_flags(setup_py, monkeypatch, capsys):
    """The CUDA branch of extensions(), up to the extension it declares: TORCH_CUDA_ARCH_LIST=7.0;9.0 with
    the real nvcc here (13.0, which rejects sm_70) gives nvcc sm_90 only, recorded in the binary, and a note
    on stderr. torch adds no -gencode of its own once the nvcc flags name an arch."""
    import shutil

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None or 70 in setup_py["nvcc_sm_list"](nvcc):
        pytest.skip("needs an nvcc that cannot build sm_70 (CUDA 13 or later)")
    cuda_home = str(pathlib.Path(os.path.realpath(nvcc)).parents[1])
    captured = {}
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)
    monkeypatch.setattr(cpp_extension, "CUDAExtension", lambda **kw: captured.update(kw) or "ext")
    monkeypatch.setitem(setup_py["extensions"].__globals__, "_want_cuda", lambda: True)  # run_path returned a copy
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "7.0;9.0")
    assert setup_py["extensions"]() == ["ext"]
    nvcc_flags = captured["extra_compile_args"]["nvcc"]
    assert _archs(f for f in nvcc_flags if f.startswith("-gencode")) == ["sm_90"]
    assert '-DCK_CUDA_ARCHS="sm_90"' in nvcc_flags
    assert cpp_extension._get_cuda_arch_flags(nvcc_flags) == []
    assert "sm_70" in capsys.readouterr().err
