"""The package's shape (issue 18): imports point down the layers, never in a circle, and the public
interface (`crowdkernels.__all__`, every command's --help) is the previous release's."""
from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

import pytest

import crowdkernels

# the sources of this checkout (what is committed), else the installed package
_SOURCES = Path(__file__).resolve().parents[1] / "crowdkernels"
PACKAGE = _SOURCES if (_SOURCES / "__init__.py").exists() else Path(crowdkernels.__file__).parent
RELEASE = Path(__file__).parent / "data" / "release_0.1.0_interface.json"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _bound_names(init: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(init.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package modules it imports, at module level or inside functions alike.
    `from . import x` counts as importing the submodule x where x is one."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, is_package, node)
                for a in node.names:
                    child = f"{base}.{a.name}"
                    if child in files:
                        targets.append(child)
                    elif node.module or base not in files or a.name in _bound_names(files[base]):
                        targets.append(base)
                    # else `from . import _C`: a compiled extension module, no Python source, no edge
            for t in targets:
                while t and t not in files:
                    t = t.rpartition(".")[0]
                if t and t != module:
                    graph[module].add(t)
                    # importing a.b.c runs a/b/__init__.py first: an edge to every package on the way that
                    # is not one of this module's own (the root's __init__ is the public facade, run first)
                    parts = t.split(".")
                    for i in range(2, len(parts)):
                        package = ".".join(parts[:i])
                        if package in files and not module.startswith(package + ".") and package != module:
                            graph[module].add(package)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    pkg = tmp_path / "crowdkernels"
    (pkg / "engine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "engine" / "__init__.py").write_text("")
    (pkg / "engine" / "a.py").write_text("def f():\n    from .b import g\n")
    (pkg / "engine" / "b.py").write_text("from ..inference import h\n")
    (pkg / "inference.py").write_text("from .engine import a\n")
    assert find_cycle(import_graph(pkg)) == ["crowdkernels.engine.a", "crowdkernels.engine.b",
                                             "crowdkernels.inference", "crowdkernels.engine.a"]
    (pkg / "inference.py").write_text("import torch\n")
    assert find_cycle(import_graph(pkg)) is None
    # a cycle through a package's __init__: importing engine.a runs engine/__init__.py, which imports b
    (pkg / "engine" / "__init__.py").write_text("from . import b\n")
    (pkg / "engine" / "a.py").write_text("import torch\n")
    (pkg / "inference.py").write_text("from .engine.a import f\n")
    assert find_cycle(import_graph(pkg)) == ["crowdkernels.engine", "crowdkernels.engine.b",
                                             "crowdkernels.inference", "crowdkernels.engine"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _release():
    return json.loads(RELEASE.read_text())


def test_public_names_are_the_previous_releases():
    assert sorted(crowdkernels.__all__) == _release()["public"]
    for name in crowdkernels.__all__:
        assert hasattr(crowdkernels, name), name


def _helps() -> dict:
    from crowdkernels.cli import build_parser

    parser = build_parser()
    helps = {"": parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps.update({name: sub.format_help() for name, sub in action.choices.items()})
    return helps


@pytest.mark.parametrize("command", sorted(_release()["help"]))
def test_help_text_is_the_previous_releases(command, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(_release()["columns"]))
    assert _helps()[command] == _release()["help"][command]


# The layers of docs/ARCHITECTURE.md, lowest first; a module takes the layer of its longest matching prefix.
LAYERS = {
    "crowdkernels._ext": 0, "crowdkernels._constants": 0, "crowdkernels._io": 0, "crowdkernels._safe_load": 0, "crowdkernels._progress": 0,
    "crowdkernels._options": 0,
    "crowdkernels.ops": 1,
    "crowdkernels.losses": 2,
    "crowdkernels.models": 3, "crowdkernels.data": 3, "crowdkernels.viz": 3,
    "crowdkernels.engine": 4,  # the engine's leaves: predict, metrics, checkpoint, config, recipes, pipeline, ...
    "crowdkernels.engine.quantize": 4,  # a leaf that imports the export leaf
    "crowdkernels.engine.evaluate": 5,
    "crowdkernels.engine.trainer": 6, "crowdkernels.inference": 6,
    "crowdkernels.engine.demo": 7,
    "crowdkernels": 8,  # the public API: re-exports from below
    "crowdkernels.cli": 9,
    "crowdkernels.__main__": 10,
}


def layer(module: str, layers: dict = LAYERS) -> int:
    name = module
    while name not in layers:
        if "." not in name:
            raise KeyError(f"{module} has no layer: give it one in LAYERS and in docs/ARCHITECTURE.md")
        name = name.rpartition(".")[0]
    return layers[name]


def upward_imports(graph: dict[str, set[str]], layers: dict = LAYERS) -> list[str]:
    """Every import that points up a layer. A package's __init__ may re-export its own modules."""
    return sorted(f"{m} -> {t}" for m, ts in graph.items() for t in ts
                  if layer(t, layers) > layer(m, layers) and not t.startswith(m + "."))


def test_the_layer_check_finds_an_upward_import(tmp_path):
    pkg = tmp_path / "crowdkernels"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .ops import density\n")
    (pkg / "ops" / "__init__.py").write_text("from . import density\n")
    (pkg / "ops" / "density.py").write_text("import torch\n")
    assert upward_imports(import_graph(pkg)) == []
    (pkg / "ops" / "density.py").write_text("def f():\n    from ..inference import load\n")
    (pkg / "inference.py").write_text("")
    assert upward_imports(import_graph(pkg)) == ["crowdkernels.ops.density -> crowdkernels.inference"]


def test_imports_point_down_the_layers():
    assert upward_imports(import_graph()) == []


def test_the_map_names_every_module():
    """docs/ARCHITECTURE.md names each module of the package, and names none that does not exist."""
    import re

    repo = Path(__file__).resolve().parents[1]  # the checkout: the installed package has no docs/ beside it
    doc = repo / "docs" / "ARCHITECTURE.md"
    named = set(re.findall(r"`(crowdkernels/[\w/]+\.py)`", doc.read_text()))
    files = {p.relative_to(repo).as_posix() for p in (repo / "crowdkernels").rglob("*.py")}
    assert sorted(files - named) == [], "modules missing from docs/ARCHITECTURE.md"
    assert sorted(named - files) == [], "docs/ARCHITECTURE.md names modules that do not exist"


def late_imports(root: Path = PACKAGE) -> list[str]:
    """The package's own modules imported inside functions or classes, except what needs an optional
    third-party package (the Triton kernels, `crowdkernels.ops.triton`) or the compiled extension (`_C`)."""
    found = []
    for path in sorted(root.rglob("*.py")):
        module = _module_name(path, root)
        tree = ast.parse(path.read_text(), str(path))
        top = {id(n) for stmt in tree.body for n in ast.walk(stmt)
               if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
        for node in ast.walk(tree):
            if id(node) in top or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.ImportFrom):
                target = _resolve(module, path.name == "__init__.py", node) if node.level else node.module or ""
                names = [f"{target}.{a.name}" for a in node.names]
            else:
                target, names = "", [a.name for a in node.names]
            for name in names if not target else [target] + names:
                if name == root.name or name.startswith(root.name + "."):
                    if not (name.startswith(f"{root.name}.ops.triton") or name.endswith("._C")):
                        found.append(f"{path.relative_to(root.parent)}:{node.lineno} {name}")
                    break
    return found


def test_the_late_import_check_finds_one(tmp_path):
    pkg = tmp_path / "crowdkernels"
    (pkg / "ops" / "triton").mkdir(parents=True)
    for init in (pkg, pkg / "ops", pkg / "ops" / "triton"):
        (init / "__init__.py").write_text("")
    (pkg / "ops" / "gating.py").write_text("try:\n    from .triton import gating\nexcept ImportError:\n    gating = None\n"
                                           "def f():\n    from .triton import gating\n")
    (pkg / "viz.py").write_text("import torch\n\ndef draw():\n    import matplotlib\n")
    assert late_imports(pkg) == []
    (pkg / "viz.py").write_text("def draw():\n    from .ops import gating\n")
    assert late_imports(pkg) == ["crowdkernels/viz.py:2 crowdkernels.ops"]


def test_late_imports_only_for_optional_packages():
    assert late_imports() == []
