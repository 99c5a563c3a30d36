"""The package's shape: imports point down the layers of ``splice.LAYERS``, with no cycles (module-level
or inside functions), the facade's names are what they say, and modules stay readable in one sitting."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import splice

ROOT = Path(splice.__file__).parent
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(path: Path, name: str) -> set[str]:
    """Every splice module ``path`` imports, anywhere in the file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "splice")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] != "splice":
                continue
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)  # `from pkg import module`
    known = _modules()
    return {m for m in found if m in known}


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:
        return len(splice.LAYERS)  # the facade sits above everything
    top = parts[1]
    assert top in splice.LAYERS, f"{module}: sub-package {top!r} is not listed in splice.LAYERS"
    return splice.LAYERS.index(top)


def test_every_subpackage_is_a_layer() -> None:
    tops = {p.parent.name for p in ROOT.glob("*/__init__.py")} | {p.stem for p in ROOT.glob("*.py")}
    tops -= {"__init__", "__main__"}
    assert tops <= set(splice.LAYERS), sorted(tops - set(splice.LAYERS))


def test_imports_point_down_the_layers() -> None:
    upward = []
    for name, path in _modules().items():
        if name in ("splice", "splice.__main__"):
            continue
        for target in _imports(path, name):
            if target == "splice":
                upward.append(f"{name} imports the facade 'splice'; import from the sub-package")
            elif _layer(target) > _layer(name):
                upward.append(f"{name} ({splice.LAYERS[_layer(name)]}) imports {target} "
                              f"({splice.LAYERS[_layer(target)]})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = {name: {t for t in _imports(path, name) if t != name} for name, path in _modules().items()}
    # A sub-package's docstring-only __init__ is imported implicitly by its modules: not an edge.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt] if nxt in stack else [node, nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_subpackage_inits_import_nothing() -> None:
    """``import splice.x.y`` runs ``splice/x/__init__.py``: it must stay free of imports. (kernels/
    is the exception: its __init__ holds the launch helpers every kernel module shares, and
    importing a kernel means torch is wanted anyway.)"""
    heavy = [p for p in ROOT.glob("*/__init__.py")
             if p.parent.name != "kernels" and any(isinstance(n, ast.Import | ast.ImportFrom) and not (
                 isinstance(n, ast.ImportFrom) and n.module == "__future__")
                 for n in ast.parse(p.read_text()).body)]
    assert not heavy, heavy


def test_modules_are_short() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_import_splice_and_cli_load_no_torch() -> None:
    code = "import sys, splice, splice.cli; print('torch' in sys.modules, 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("name", sorted(splice.__all__))
def test_facade_names_are_stable(name: str) -> None:
    """Each public name is the object its module defines, before and after its sub-package loads
    (a sub-package named like a function once shadowed ``splice.train`` and ``splice.generate``)."""
    first = getattr(splice, name)
    module = __import__(f"splice.{splice._EXPORTS[name]}", fromlist=[name])
    assert getattr(splice, name) is first is getattr(module, name)
    assert not isinstance(first, type(splice)), f"splice.{name} is a module"


def test_tests_share_helpers_through_tests_tiny_only() -> None:
    """Tests import shared models and helpers from tests/tiny.py, never from a sibling test file
    or from conftest.py (pytest loads those itself)."""
    bad = []
    for path in (ROOT.parent / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tests."):
                leaf = node.module.rsplit(".", 1)[-1]
                if leaf.startswith("test_") or leaf == "conftest":
                    bad.append(f"{path.relative_to(ROOT.parent)}: from {node.module}")
    assert not bad, bad
