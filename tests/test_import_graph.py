"""The package's imports form a DAG that points down the layers (issue 13, item 4).

Read from the source with `ast` (nothing is imported): every `import` / `from ... import` naming a
vlmo_large module, at module level or inside a function, is an edge. The test fails on a cycle
(named module by module) and on an import that goes up, or sideways between two packages of the
same layer.
"""
from __future__ import annotations

import ast
import os

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
PACKAGE = "vlmo_large"

# Bottom first. A module may import its own package and the packages of lower layers only.
# (tools/, benchmarks/, launchers/ and tests/ sit above the package and are not part of it.)
LAYERS = (
    ("errors",),
    ("config", "cpu_threads", "cpu_memory"),
    ("model", "data", "tracking"),             # data and tracking: no model code in them, none in model
    ("parallel", "formats", "evaluation"),     # parallel: groups and TP/PP plumbing around model/
    ("tasks", "checkpoint", "memory"),         # checkpoint and formats never reach training/
    ("training",),
)
OUTSIDE = ("launchers", "tools", "benchmarks", "tests")  # above the package: never imported by it


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, package) of a dotted module name: its first component below vlmo_large."""
    part = module.split(".")[1] if "." in module else ""
    for index, names in enumerate(LAYERS):
        if part in names:
            return index, part
    raise AssertionError(f"{module}: '{part}' is in no layer of LAYERS; add it to the table")


def package_modules() -> dict[str, str]:
    """{dotted name: path} of every module of the package (a package is named by its __init__)."""
    found = {}
    for folder, _, files in os.walk(os.path.join(REPO, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def imported_names(module: str, path: str, tree: ast.AST) -> list[tuple[str, int]]:
    """(dotted name, line) of everything an import statement anywhere in `tree` names. `from p import m`
    names p.m: an edge to the submodule m when there is one, else to p (the parent package's
    __init__ also runs, but a package importing its own submodules is no cycle to report)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                parts = module.split(".") if path.endswith("__init__.py") else module.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
    return names


def import_graph() -> tuple[dict[str, dict[str, int]], list[tuple[str, str, int]]]:
    """({module: {imported module: line}}, [(module, outside name, line)])."""
    modules = package_modules()
    graph, outside = {}, []
    for module, path in modules.items():
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), path)
        edges = {}
        for name, line in imported_names(module, path, tree):
            top = name.split(".")[0]
            if top in OUTSIDE:
                outside.append((module, name, line))
            if top != PACKAGE:
                continue
            while name not in modules:  # `from pkg.mod import attr` names pkg.mod.attr: keep pkg.mod
                name = name.rsplit(".", 1)[0]
            if name != module and (name not in edges or line < edges[name]):
                edges[name] = line
        graph[module] = edges
    return graph, outside


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """A cycle as [a, b, ..., a], or None (iterative depth-first search, three colours)."""
    colour, parent = {}, {}
    for root in sorted(graph):
        if root in colour:
            continue
        colour[root], stack = "grey", [(root, iter(sorted(graph[root])))]
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = "black"
                stack.pop()
            elif colour.get(child) == "grey":
                cycle = [child, node]
                while cycle[-1] != child:
                    cycle.append(parent[cycle[-1]])
                return cycle[::-1]
            elif child not in colour:
                colour[child], parent[child] = "grey", node
                stack.append((child, iter(sorted(graph[child]))))
    return None


def layer_violations(graph: dict[str, dict[str, int]]) -> list[str]:
    found = []
    for module, edges in graph.items():
        if module == PACKAGE:
            continue
        level, package = layer_of(module)
        for target, line in edges.items():
            if target == PACKAGE:
                continue
            target_level, target_package = layer_of(target)
            if target_package != package and target_level >= level:
                found.append(f"{module}:{line} imports {target} ({target_package}, layer {target_level}; "
                             f"{package} is layer {level})")
    return sorted(found)


def test_the_package_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph()[0])
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_up_or_across_the_layers():
    graph, outside = import_graph()
    assert not layer_violations(graph), "\n".join(layer_violations(graph))
    assert not outside, f"the package imports code from outside it: {outside}"


def test_every_package_is_in_the_layer_table():
    packages = {layer_of(module)[1] for module in import_graph()[0] if module != PACKAGE}
    listed = {name for names in LAYERS for name in names}
    assert packages == listed, f"in the table but not the package: {sorted(listed - packages)}"


def test_the_checks_catch_a_cycle_and_an_upward_import():
    """The checks themselves, on a made-up graph: model -> training is upward, and a cycle."""
    graph = {"vlmo_large.model.a": {"vlmo_large.training.b": 3},
             "vlmo_large.training.b": {"vlmo_large.model.a": 1}}
    assert find_cycle(graph) == ["vlmo_large.model.a", "vlmo_large.training.b", "vlmo_large.model.a"]
    assert layer_violations(graph) == [
        "vlmo_large.model.a:3 imports vlmo_large.training.b (training, layer 5; model is layer 2)"]
    sideways = {"vlmo_large.data.x": {"vlmo_large.model.y": 1}, "vlmo_large.model.y": {}}
    assert len(layer_violations(sideways)) == 1
    assert find_cycle({"vlmo_large.model.y": {}, "vlmo_large.data.x": {"vlmo_large.model.y": 1}}) is None
