"""The source tree stays easy to read: small files, and no import cycle between them.

Every import statement counts, function-level ones included (a lazy import is still a dependency); only
imports under `if TYPE_CHECKING:` do not run and are left out. An import of `pkg.mod` counts as an edge to
`pkg.mod` alone: the parent packages' `__init__` files run first, but they only gather names.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"dit_sparse": "dit_sparse", "kernels": "dit_sparse.kernels", "pipelines": "dit_sparse.pipelines",
           "eval": "dit_sparse.eval"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    """Import name -> file, for every source file of the package's four folders."""
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    """The package modules `tree` imports (resolved to the most specific module that exists)."""
    here = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in modules and name != module}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", modules)
            for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_the_checker_finds_a_cycle_and_resolves_relative_imports():
    modules = {"p": Path("p/__init__.py"), "p.a": Path("p/a.py"), "p.b": Path("p/b.py")}
    a = _imports(ast.parse("from .b import x\nif TYPE_CHECKING:\n    from . import a"), "p.a", False, modules)
    b = _imports(ast.parse("def f():\n    from p import a"), "p.b", False, modules)
    assert a == {"p.b"} and b == {"p.a"}
    assert _cycles({"p": set(), "p.a": a, "p.b": b}) == [["p.a", "p.b"]]


def test_no_import_cycle_between_source_files():
    graph = _graph()
    assert len(graph) > 50 and graph["dit_sparse.core"], "the import graph was not read"
    assert _cycles(graph) == []


def test_no_source_file_above_400_lines():
    long = {str(path.relative_to(ROOT)): n for path in _modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}
