"""The import graph of modcompile/ and benchmarks/ has no cycles, and no file edits sys.path.

The graph comes from an AST walk (no imports run): every ``import`` and ``from ... import``, at
module level or inside a function (a lazy import is still a dependency), resolved to the module it
names; ``from pkg import name`` counts as an import of ``pkg.name`` when that is a module, else of
``pkg``: the reading of grimp / import-linter (a package's ``__init__`` runs before any of its
modules anyway, so it is not counted as their dependency). Run this file as a script to print the strongly connected components of more than one
module (the cycles) and the edge count: ``python tests/test_import_graph.py``.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("modcompile", "benchmarks")


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages."""
    out = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _resolve(module: str, path: Path, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the modules of the packages it imports."""
    files = module_files(root)
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, path, node.level, node.module)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            for name in names:
                # "import a.b.c" depends on a.b.c (the deepest module of the packages it names).
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    graph[module].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_cycles_are_found(tmp_path):
    # The checker itself: a two-module cycle through a lazy import is reported.
    pkg = tmp_path / "modcompile"
    pkg.mkdir()
    (tmp_path / "benchmarks").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    (pkg / "c.py").write_text("import modcompile.a\n")
    assert cycles(import_graph(tmp_path)) == [["modcompile.a", "modcompile.b"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_no_sys_path_edits():
    edits = [str(p.relative_to(ROOT)) for p in module_files().values()
             if "sys.path" in p.read_text()]
    assert edits == []


if __name__ == "__main__":
    g = import_graph()
    print(f"{len(g)} modules, {sum(map(len, g.values()))} edges")
    for component in cycles(g):
        print(f"cycle of {len(component)}: {' '.join(component)}")
