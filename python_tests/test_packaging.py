"""The install and CI promises: the README's Quick start, .ci/run running its test command verbatim,
setup.py stopping at once without torch, and backends() reporting what was built."""
from __future__ import annotations

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
