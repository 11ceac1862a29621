"""The package's import graph, built from the source: no cycles, and every import points down the
layers (docs/architecture.md):

    cli → search → run → analysis → store → spec → base (errors, names, provenance)

plus the trainer's config tree (trainer.config, trainer.presets) and its provenance (trainer.env:
git_commit), nothing else of the trainer (the rest is the JSON-lines events it prints).
Deferred imports inside functions count: an import moved into a function to dodge a cycle is still
a cycle. Imports under `if TYPE_CHECKING:` (annotations only) do not."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "ablate"
LAYERS = ["base", "spec", "store", "analysis", "run", "search", "cli"]  # low → high
TRAINER_ALLOWED = {"trainer", "trainer.config", "trainer.presets", "trainer.env"}


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(pkg: Path = PKG) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(pkg.rglob("*.py"))}


def layer(mod: str) -> str:
    parts = mod.split(".")
    if mod == "ablate.__main__":
        return "cli"
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    return "base"


def imports(path: Path, mods: dict[str, Path]) -> set[str]:
    return imports_of(path.read_text(), module_name(path), path.name == "__init__.py", mods)


def imports_of(src: str, me: str, is_package: bool, mods: dict[str, Path]) -> set[str]:
    """Every ablate/trainer module the source imports, anywhere (functions included).
    `from pkg import sub` is an import of pkg.sub when sub is a module, else of pkg."""
    out: set[str] = set()
    tree = ast.parse(src)
    typing_only = set()  # `if TYPE_CHECKING:` blocks import for annotations only, never at run time
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                pkg = me.split(".") if is_package else me.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            names = []
            for a in node.names:
                full = f"{base}.{a.name}"
                names.append(full if full in mods else base)
        else:
            continue
        for n in names:
            if n.split(".")[0] in ("ablate", "trainer") and n != me:
                out.add(n)
    return out


GRAPH = {m: imports(p, modules()) for m, p in modules().items()}


def test_every_module_sits_in_a_layer_package():
    flat = [m for m in GRAPH if layer(m) == "base" and m.count(".") == 1]
    assert sorted(flat) == ["ablate.errors", "ablate.names", "ablate.provenance"], flat


@pytest.mark.parametrize("mod", sorted(GRAPH))
def test_imports_point_down(mod):
    mine = LAYERS.index(layer(mod))
    for dep in sorted(GRAPH[mod]):
        if dep.startswith("trainer"):
            assert dep in TRAINER_ALLOWED, f"{mod} imports {dep}: ablate may use only the trainer's config tree"
            continue
        if dep == "ablate":  # the package root: __version__
            continue
        assert LAYERS.index(layer(dep)) <= mine, f"{mod} ({layer(mod)}) imports {dep} ({layer(dep)}): points up"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    # package __init__ re-exports (ablate.cli → ablate.cli.main) are edges like any other
    graph = {m: {d for d in deps if d in GRAPH and d != "ablate"} for m, deps in GRAPH.items()}
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_trainer_has_no_import_cycles():
    mods = modules(ROOT / "trainer")
    graph = {m: {d for d in imports(p, mods) if d in mods and d != "trainer"} for m, p in mods.items()}
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_cycle_finder():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_sees_deferred_relative_and_submodule_imports():
    src = ("def f():\n    from ablate.cli.main import app\n"
           "from . import tables\nfrom ablate.store import parquet\nimport trainer.train\n"
           "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ablate.search.driver import x\n")
    found = imports_of(src, "ablate.analysis.report", False, modules())
    assert {"ablate.cli.main", "ablate.analysis.tables", "ablate.store.parquet", "trainer.train"} <= found
    assert "ablate.search.driver" not in found
