"""The layout docs/architecture.md draws, checked: no import cycle between fedshard's files (the
layers themselves are import-linter's contract in pyproject.toml, which .ci/run checks), and a
package tree a newcomer can take in at a glance."""

from __future__ import annotations

from pathlib import Path

import grimp

import fedshard


def import_cycles(graph) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan), each a cycle of imports."""
    edges = {m: graph.find_modules_directly_imported_by(m) for m in graph.modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_itself_through_others():
    # Imports under TYPE_CHECKING run nothing: only annotations name those modules.
    graph = grimp.build_graph("fedshard", include_external_packages=False, exclude_type_checking_imports=True)
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=a, imported=b)
    assert import_cycles(graph) == [["p.a", "p.b", "p.c"]]


def test_the_package_shows_its_layers_at_its_top():
    top = sorted(p.name for p in Path(fedshard.__file__).parent.iterdir() if not p.name.startswith(("_", ".")))
    # model.py only keeps the path final models logged before the registry were pickled under.
    assert top == ["cli", "core", "model.py", "results", "runtime", "sweep", "tracking"]
