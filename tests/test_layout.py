"""The package's architecture, checked: subpackages by pipeline stage with data flowing one way, no import cycles,
no module reaching into another's private names, and modules of a readable size."""

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "src" / "ckptkd"

# Lower stages first; a module may import from its own stage and the ones before it, never from a later one.
STAGES = [
    {"errors", "config", "formatting", "stats", "losses", "processes", "memory"},   # shared leaves
    {"data", "models"},
    {"run"},                                                  # the run folder and its storage
    {"teachers"},
    {"training"},
    {"selection"},
    {"study"},
    {"cli"},
]

# Modules allowed above ~600 lines, with the reason (none today).
LONG_MODULES: dict[str, str] = {}
MAX_LINES = 600


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth (function-level
    imports are dependencies too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.startswith("ckptkd")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("ckptkd"):
                found.append((target, [alias.name for alias in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {m: set() for m in modules}
    for name, path in modules.items():
        for target, names in _imports(name, path):
            # `from pkg import sub` imports the submodule pkg.sub
            targets = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _stage(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None  # the package itself (its lazy names point everywhere by design) and `python -m ckptkd`
    return next(i for i, stage in enumerate(STAGES) if parts[1] in stage)


def test_every_module_belongs_to_a_stage():
    unplaced = [m for m in _modules() if m != "ckptkd.__main__" and m.count(".") >= 1
                and m.split(".")[1] not in set().union(*STAGES)]
    assert unplaced == []


def test_data_flows_one_way_between_stages():
    upward = [f"{m} -> {t}" for m, targets in _graph().items() for t in targets
              if _stage(m) is not None and _stage(t) is not None
              and _stage(t) > _stage(m)]
    assert upward == []


def test_no_import_cycles():
    graph = _graph()
    index, low, on_stack, stack, cycles, counter = {}, {}, set(), [], [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
            # A package's __init__ re-exporting its own submodules is not a cycle of dependencies.
            real = [m for m in component if not any(m.startswith(o + ".") for o in component)]
            if len(component) > 1 and len(real) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert cycles == []


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    private = [f"{name}: {target}.{n}" for name, path in modules.items() for target, names in _imports(name, path)
               for n in names if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_modules_are_of_a_readable_size():
    long = {name: len(path.read_text().splitlines()) for name, path in _modules().items()
            if len(path.read_text().splitlines()) > MAX_LINES and name not in LONG_MODULES}
    assert long == {}


def test_the_layout_check_sees_what_it_checks():
    """The checks above would see a violation: the graph has the known edges (training uses teachers, the study
    uses training) and every stage's modules."""
    graph = _graph()
    assert "ckptkd.teachers" in graph["ckptkd.training.api"] or any(
        t.startswith("ckptkd.teachers") for t in graph["ckptkd.training.api"])
    assert any(t.startswith("ckptkd.training") for t in graph["ckptkd.study.execution"])
    assert {_stage(m) for m in graph if _stage(m) is not None} == set(range(len(STAGES)))
