"""Package layering: the import graph of mixroute's units (each subpackage, each top-level module), read from the
source with ``ast`` and counting imports inside functions, has no cycle and no import against the layering of
docs/architecture.md; and every unit imports on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "mixroute"
ROOT_UNIT = "mixroute"  # the package's own __init__.py (public re-exports)

# unit -> units it must not import (lower layers never reach up; cli is the top and may import anything)
ABOVE_RUNDIR = {"cli", "demo", "train", "evaluate", "report", "prune", "federated"}
FORBIDDEN = {
    "rundir": ABOVE_RUNDIR,
    "evaluate": ABOVE_RUNDIR - {"evaluate"},
    "train": ABOVE_RUNDIR - {"train", "evaluate"},
    "report": ABOVE_RUNDIR - {"report"},
    "prune": ABOVE_RUNDIR - {"prune", "evaluate"},
    "federated": ABOVE_RUNDIR - {"federated", "train", "evaluate"},  # only cli imports federated
    "library": ABOVE_RUNDIR - {"evaluate"} | {"serve"},   # serve reads a library, never the reverse
    **{low: ABOVE_RUNDIR | {"rundir"} for low in ("mixture", "experts", "routers", "methods")},
    **{low: ABOVE_RUNDIR | {"rundir", "mixture", "experts", "routers", "methods"}
       for low in ("data", "models", "config", "fileio", "arch")},
    **{leaf: ABOVE_RUNDIR | {"rundir", "mixture", "experts", "routers", "methods", "data", "models", "config",
                             "fileio"} for leaf in ("devices", "progress")},
}


def units() -> list[str]:
    found = [p.stem for p in SRC.glob("*.py") if p.name != "__init__.py"]
    found += [p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()]
    return sorted(found)


def _unit_of(module: str, names: list[str], known: set[str]) -> list[str]:
    """Units named by ``import module`` / ``from module import names`` (absolute module path)."""
    parts = module.split(".")
    if parts[0] != "mixroute":
        return []
    if len(parts) > 1:
        return [parts[1]]
    return [n if n in known else ROOT_UNIT for n in names] or [ROOT_UNIT]


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every mixroute unit ``path`` imports, at module level or inside functions."""
    package = path.relative_to(SRC.parent).parts[:-1]  # ("mixroute", "train") for train/loop.py and train/__init__.py
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.update(_unit_of(alias.name, [], known))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this file's package
                base = package[:len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out.update(_unit_of(module, [a.name for a in node.names], known))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)):
            out.update(_unit_of(node.args[0].value, [], known))
    return out


def import_graph() -> dict[str, set[str]]:
    known = set(units())
    graph: dict[str, set[str]] = {u: set() for u in [*known, ROOT_UNIT]}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).parts
        unit = ROOT_UNIT if rel == ("__init__.py",) else Path(rel[0]).stem
        graph[unit] |= imports_of(path, known) - {unit}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle as [a, b, ..., a], or [] when the graph is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(u: str) -> list[str]:
        state[u] = 1
        path.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return path[path.index(v):] + [v]
            if v not in state and (cycle := visit(v)):
                return cycle
        path.pop()
        state[u] = 2
        return []

    for u in sorted(graph):
        if u not in state and (cycle := visit(u)):
            return cycle
    return []


def test_the_graph_reader_sees_function_level_imports():
    graph = import_graph()
    assert "rundir" in graph["evaluate"] and "evaluate" in graph["train"]
    assert "mixture" in graph["rundir"]  # inside load_run


def test_no_import_cycle_between_units():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_import_against_the_layering():
    graph = import_graph()
    bad = sorted(f"{u} imports {v}" for u, banned in FORBIDDEN.items() for v in graph.get(u, ()) & banned)
    assert not bad, "; ".join(bad)


@pytest.fixture(scope="module")
def fresh_imports() -> dict[str, subprocess.Popen]:
    """Every unit imported in its own fresh interpreter, all started at once (each waits on disk and imports
    of torch; one after another they took a minute)."""
    procs = {u: subprocess.Popen([sys.executable, "-c", f"import mixroute.{u}"], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True) for u in units()}
    yield procs
    for p in procs.values():
        p.kill()
        p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("unit", units())
def test_unit_imports_alone(unit, fresh_imports):
    _, err = fresh_imports[unit].communicate(timeout=600)
    assert fresh_imports[unit].returncode == 0, err[-3000:]
