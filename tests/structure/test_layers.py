"""The package's layers, read from the code's own imports (those inside functions too).

Every module sits in one layer; a module imports only from its own layer or the ones below it,
never from a sibling area of its layer (`models/` and `datasets/` import neither each other), and
no set of modules imports itself around a circle. A failure names both ends of the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "rsrefseg"

# Bottom to top. Each entry is one layer: a tuple of areas (module-name prefixes). An area may
# import from itself and from every layer below; areas of one layer may not import each other.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("rsrefseg.platform.errors", "rsrefseg.platform.atomic", "rsrefseg.platform.metric_names"),
    ("rsrefseg.platform.console",),
    ("rsrefseg.platform.config",),
    ("rsrefseg.platform.paths", "rsrefseg.platform.signals"),
    ("rsrefseg.platform.storage", "rsrefseg.platform.recipes"),
    ("rsrefseg.platform.runs", "rsrefseg.platform.tracking", "rsrefseg.platform.shared_storage"),
    ("rsrefseg.platform",),  # Ray: ray_session, capacity, ray_compat
    ("rsrefseg.datasets", "rsrefseg.models"),
    ("rsrefseg.inference",),
    ("rsrefseg.training",),
    ("rsrefseg.jobs",),
    ("rsrefseg.cli", "rsrefseg.serving"),
    ("rsrefseg", "rsrefseg.__main__"),  # the package's face (the public API) and `python -m`
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path) -> list[tuple[str, int]]:
    """(module, line) of every rsrefseg module `name` imports, at any depth of its code."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names if a.name.startswith("rsrefseg")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.startswith("rsrefseg"):
                out += [(f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source, node.lineno)
                        for a in node.names]
    return [(m, line) for m, line in out if m != name]


EDGES = {name: imported(name, path) for name, path in MODULES.items()}


def area(module: str) -> tuple[int, str]:
    """(layer index, area) of a module: the longest area prefix that names it."""
    best = (-1, "")
    for index, areas in enumerate(LAYERS):
        for a in areas:
            if (module == a or module.startswith(a + ".")) and len(a) > len(best[1]):
                best = (index, a)
    assert best[0] >= 0, f"{module} is in no layer of LAYERS"
    return best


def test_every_module_has_a_layer():
    for name in MODULES:
        area(name)


def test_no_import_against_the_layers():
    wrong = []
    for name, targets in EDGES.items():
        layer, own = area(name)
        for target, line in targets:
            if target == "rsrefseg" and area(name)[1] != "rsrefseg":
                wrong.append(f"{MODULES[name]}:{line}: {name} imports the package face `rsrefseg`")
                continue
            t_layer, t_area = area(target)
            if t_layer > layer or (t_layer == layer and t_area != own):
                wrong.append(f"{MODULES[name]}:{line}: {name} ({own}) imports {target} ({t_area}), "
                             "which is not below it")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def cycles(edges: dict[str, list[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    graph = {name: sorted({t for t, _ in targets if t in MODULES and t != "rsrefseg"})
             for name, targets in EDGES.items()}
    assert cycles(graph) == []


def test_the_checks_see_a_cycle_and_a_wrong_import():
    """The checks themselves: a made-up circle is found, and an import upwards is refused."""
    assert cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert area("rsrefseg.jobs.train")[0] > area("rsrefseg.training.worker")[0]
    assert area("rsrefseg.models.sam")[0] == area("rsrefseg.datasets.prepare")[0]
    assert area("rsrefseg.models.sam")[1] != area("rsrefseg.datasets.prepare")[1]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_are_short(name):
    """No function body over 60 lines: a longer one is several steps that want names."""
    long = [f"{MODULES[name]}:{n.lineno} {n.name} ({n.end_lineno - n.lineno + 1} lines)"
            for n in ast.walk(ast.parse(MODULES[name].read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.end_lineno - n.lineno + 1 > 60]
    assert not long, "\n".join(long)
