"""The README's promises, run: its ```python blocks execute in order (after the Quick start's demo, whose
outputs the first block uses), its `.venv/bin/crowdkernels ...` example commands succeed, the Quick start
block holds exactly two commands, and `.ci/run` runs the README's test command verbatim."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO
from crowdkernels import cli

README = (REPO / "README.md").read_text()
HERE = Path(__file__).resolve()


def _blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def _section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def test_quick_start_is_two_commands_and_ci_runs_the_test_command_verbatim():
    (block,) = re.findall(r"^```bash\n(.*?)^```", _section("Quick start"), flags=re.S | re.M)
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    assert commands[0].startswith("bash .ci/bootstrap && ") and "crowdkernels demo" in commands[0]
    test_command = commands[1]
    assert "pytest" in test_command
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test_command in ci, f".ci/run does not run the README's test command {test_command!r} verbatim"


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    """What the Quick start's first line leaves in the working folder (the --fast run: the same files)."""
    where = tmp_path_factory.mktemp("readme")
    assert cli.main(["demo", "--fast", "--out", str(where / "crowdkernels-demo")]) == 0
    return where


def test_python_blocks_run(demo_dir, monkeypatch):
    blocks = _blocks("python")
    assert len(blocks) >= 3
    assert blocks[0].lstrip().startswith("import crowdkernels as ck") and "ck.load(" in blocks[0]  # the API comes first
    assert README.index("ck.load(") < README.index("## API at a glance")
    monkeypatch.chdir(demo_dir)
    first: dict = {}
    exec(compile(blocks[0], "README.md python block 1", "exec"), first)
    # the first block's promises, checked on what it computed
    assert abs(float(first["d"].sum()) - first["n"]) <= 1e-4 * max(1.0, abs(first["n"]))
    assert len(first["counts"]) == 4 and first["counts"][0] == pytest.approx(first["n"], rel=1e-5)
    namespace: dict = {}  # the API blocks build on each other
    for i, code in enumerate(blocks[1:], 2):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)


def test_example_commands_run(demo_dir, monkeypatch, capsys):
    monkeypatch.chdir(demo_dir)
    commands = [line.strip() for block in _blocks("bash") for line in block.splitlines()
                if line.strip().startswith(".venv/bin/crowdkernels ")]
    assert len(commands) >= 2
    for command in commands:
        argv = shlex.split(command)[1:]
        assert cli.main(argv) == 0, (command, capsys.readouterr().err[-2000:])
    assert (demo_dir / "crowdkernels-demo" / "report" / "predictions.csv").is_file()


def test_the_readme_names_every_format_model_and_dataset():
    from crowdkernels.data import DATASET_NAMES, FORMATS
    from crowdkernels.models import MODEL_NAMES

    for name in FORMATS:
        assert f"`{name}`" in README, f"format {name} missing from the README"
    for name in MODEL_NAMES:
        assert f"`{name}`" in README, f"model {name} missing from the README"
    for name in DATASET_NAMES:
        assert f"`{name}`" in README, f"dataset {name} missing from the README"


def test_docs_the_sources_point_to_exist_and_the_readme_shows_torchrun_and_predictions():
    """Issue 21, item 12: docstrings said "see DESIGN.md", a file not in the repository; the README named
    torchrun without a command; count_many's bare floats had no word on predictions() and .source."""
    pointers = re.compile(r"\b(?:[A-Z][A-Z_]+\.md|docs/[\w./-]+\.md)")
    for folder in ("crowdkernels", "python_tests", "csrc", "examples", "benchmarks"):
        for path in (REPO / folder).rglob("*"):
            if path.suffix not in (".py", ".h", ".cpp", ".cu", ".cuh") or "__pycache__" in path.parts or path == HERE:
                continue
            for name in set(pointers.findall(path.read_text(errors="replace"))):
                if name.startswith("docs/") or name == "DESIGN.md":
                    assert (REPO / name).is_file(), f"{path.relative_to(REPO)} points to {name}, which is not in the repo"
    assert "see DESIGN.md" not in (REPO / "crowdkernels" / "ops" / "reference.py").read_text()
    assert (REPO / "docs" / "definitions.md").read_text().count("## ") >= 3
    assert re.search(r"^torchrun --standalone --nproc_per_node 2 -m crowdkernels train ", README, flags=re.M)
    assert "predictions(" in README and ".source" in README
