"""The modules of cellseg import one another without a cycle (lazy imports inside functions count too), and the
ones every model's code shares import (almost) nothing of cellseg."""

from __future__ import annotations

from pathlib import Path

from test_stage_deps import SRC, _imports

PACKAGE = SRC / "cellseg"


def _graph() -> dict[Path, set[Path]]:
    return {path: _imports(path) - {path} for path in sorted(PACKAGE.rglob("*.py"))}


def find_cycle(graph: dict[Path, set[Path]]) -> list[Path] | None:
    """One import cycle of ``graph`` (module → modules it imports), as a path that ends where it began; or None."""
    state: dict[Path, str] = {}
    stack: list[Path] = []

    def visit(node: Path) -> list[Path] | None:
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph.get(node, ())):
            if state.get(child) == "open":
                return stack[stack.index(child) :] + [child]
            if child not in state and (cycle := visit(child)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in graph:
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(_graph())
    assert cycle is None, " → ".join(str(p.relative_to(PACKAGE)) for p in cycle)


def test_a_cycle_is_found() -> None:
    """The check can fail: an edge back from a module to one that imports it closes a cycle."""
    graph = _graph()
    inference, registry = PACKAGE / "inference.py", PACKAGE / "registry.py"
    assert registry in graph[inference]
    graph[registry] = graph[registry] | {inference}
    assert find_cycle(graph) is not None


def test_shared_modules_are_leaves() -> None:
    """Cell types import nothing of cellseg; instances (what every predictor gives) only the cell types."""
    assert _imports(PACKAGE / "celltypes.py") == set()
    assert _imports(PACKAGE / "instances.py") == {PACKAGE / "__init__.py", PACKAGE / "celltypes.py"}


def test_category_ids_are_numbered_once() -> None:
    """The COCO export takes its category ids from the cell types (still importable from ``cellseg.coco``)."""
    from cellseg import celltypes, coco

    assert PACKAGE / "celltypes.py" in _imports(PACKAGE / "coco.py")
    assert coco.CATEGORY_IDS is celltypes.CATEGORY_IDS
    assert coco.CATEGORY_IDS == {"shsy5y": 1, "astro": 2, "cort": 3}
