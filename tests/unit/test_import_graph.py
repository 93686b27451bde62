"""The package's import graph follows the layer order of docs/modules.md and has no cycles.

The graph is read from the source with `ast` (every `import` / `from ... import` of a `seesaw_ds` module,
at module level, inside functions and under `TYPE_CHECKING` alike), so nothing is imported to build it.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "seesaw_ds"

#: Bottom to top, as in docs/modules.md ("Layers"): a module may import its own layer and the ones below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("seesaw_ds.faults", "seesaw_ds.cpu_features", "seesaw_ds.probes", "seesaw_ds.cache"),
    ("seesaw_ds.backends",),
    ("seesaw_ds.distributed",),
    ("seesaw_ds.config",),
    ("seesaw_ds.kv",),
    ("seesaw_ds.model",),
    ("seesaw_ds.engine",),
    ("seesaw_ds.sim",),
    ("seesaw_ds.cpu_dtype", "seesaw_ds.runtime"),
    ("seesaw_ds.cli",),
    ("seesaw_ds.bench",),
)

#: Cycles tolerated for now, each as the set of its modules (a cycle among exactly these passes). None: the
#: last one (model/attention.py <-> model/device_attention.py) went with model/attention_reference.py.
KNOWN_CYCLES: tuple[frozenset[str], ...] = ()


def module_names(root: Path) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name (a package by its own name)."""
    names = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (a name imported from a package that is a module of its
    own counts as that module)."""
    modules = module_names(root)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
                    for _ in range(node.level - 1):
                        base = base.rpartition(".")[0]
                    module = f"{base}.{node.module}" if node.module else base
                else:
                    module = node.module or ""
                for alias in node.names:
                    targets.add(f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module)
        graph[name] = {target for target in targets if target in modules and target != name}
    return graph


def layer_of(module: str, layers=LAYERS) -> int:
    """The index of the layer `module` belongs to (its longest listed prefix)."""
    best, best_length = -1, -1
    for index, prefixes in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_length:
                best, best_length = index, len(prefix)
    return best


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """Every import of a module from a higher layer, and every module in no layer, as readable lines."""
    problems = []
    for module, targets in sorted(graph.items()):
        if layer_of(module, layers) < 0 and module != "seesaw_ds":
            problems.append(f"{module} is in no layer: add it to LAYERS and docs/modules.md")
        for target in sorted(targets):
            if layer_of(target, layers) > layer_of(module, layers):
                problems.append(f"{module} imports {target} from a higher layer")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def unexpected_cycles(graph: dict[str, set[str]], known=KNOWN_CYCLES) -> list[list[str]]:
    """The cycles of `graph` that are not known exceptions, each as its sorted modules."""
    return sorted(sorted(cycle) for cycle in cycles(graph) if cycle not in known)


def test_the_package_has_no_import_cycle():
    assert unexpected_cycles(import_graph(PACKAGE)) == []


def test_the_package_imports_only_downward():
    assert upward_imports(import_graph(PACKAGE)) == []


def test_the_graph_sees_imports_of_every_form(tmp_path):
    """The reader is not vacuous: `import a.b`, `from package import module`, `from module import name`,
    imports inside functions and under TYPE_CHECKING all count; outside modules do not."""
    package = tmp_path / "seesaw_ds"
    (package / "engine").mkdir(parents=True)
    for name in ("__init__.py", "engine/__init__.py", "engine/b.py", "engine/c.py", "engine/d.py", "engine/e.py",
                 "faults.py"):
        (package / name).write_text("")
    (package / "engine" / "a.py").write_text(
        "import os\nimport seesaw_ds.faults\nfrom seesaw_ds.engine import b\nfrom seesaw_ds.engine.c import thing\n"
        "def f():\n    from seesaw_ds.engine import d\n"
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from seesaw_ds.engine.e import Other\n")
    graph = import_graph(package)
    assert graph["seesaw_ds.engine.a"] == {"seesaw_ds.faults", "seesaw_ds.engine.b", "seesaw_ds.engine.c",
                                           "seesaw_ds.engine.d", "seesaw_ds.engine.e"}
    real = import_graph(PACKAGE)
    assert len(real) > 50 and sum(map(len, real.values())) > 100  # the package's own graph is read too


def test_the_checker_fails_on_a_made_up_cycle():
    graph = {"seesaw_ds.engine.a": {"seesaw_ds.engine.b"}, "seesaw_ds.engine.b": {"seesaw_ds.engine.c"},
             "seesaw_ds.engine.c": {"seesaw_ds.engine.a"}, "seesaw_ds.engine.d": {"seesaw_ds.engine.a"}}
    assert unexpected_cycles(graph) == [["seesaw_ds.engine.a", "seesaw_ds.engine.b", "seesaw_ds.engine.c"]]
    assert unexpected_cycles({"seesaw_ds.x": {"seesaw_ds.y"}, "seesaw_ds.y": {"seesaw_ds.x"}}) == [
        ["seesaw_ds.x", "seesaw_ds.y"]]  # two modules importing each other
    assert unexpected_cycles({"seesaw_ds.x": {"seesaw_ds.y"}, "seesaw_ds.y": set()}) == []
    known = (frozenset({"seesaw_ds.x", "seesaw_ds.y"}),)  # a listed exception passes, and only that one
    assert unexpected_cycles({"seesaw_ds.x": {"seesaw_ds.y"}, "seesaw_ds.y": {"seesaw_ds.x"}}, known) == []
    assert unexpected_cycles(graph, known) == [["seesaw_ds.engine.a", "seesaw_ds.engine.b", "seesaw_ds.engine.c"]]


def test_the_checker_fails_on_a_made_up_upward_import():
    graph = {"seesaw_ds.distributed.groups": {"seesaw_ds.engine.leader"}, "seesaw_ds.engine.leader": set(),
             "seesaw_ds.nowhere": set()}
    assert upward_imports(graph) == [
        "seesaw_ds.distributed.groups imports seesaw_ds.engine.leader from a higher layer",
        "seesaw_ds.nowhere is in no layer: add it to LAYERS and docs/modules.md"]


def test_a_relative_import_is_resolved(tmp_path):
    package = tmp_path / "seesaw_ds"
    (package / "engine").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "engine" / "__init__.py").write_text("")
    (package / "engine" / "a.py").write_text("from . import b\nfrom .b import thing\n")
    (package / "engine" / "b.py").write_text("from ..engine import a\n")
    assert cycles(import_graph(package)) == [frozenset({"seesaw_ds.engine.a", "seesaw_ds.engine.b"})]
