"""The shape of the code: no import cycles, the layers in order, modules and functions of a size one can read."""

import ast
from pathlib import Path

from rlhf.code_version import _imported_names, module_file

PROJECT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlhf", "tasks", "flows")
LAYERS = {"rlhf": set(), "tasks": {"rlhf"}, "flows": {"rlhf", "tasks"}}  # what each package may import of the others
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def project_modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((PROJECT / package).rglob("*.py")):
            parts = path.relative_to(PROJECT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its body (function-level imports run too)."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        imported = _imported_names(ast.parse(path.read_text()), name, path.name == "__init__.py")
        graph[name] = {m for m in imported if m in modules and module_file(m, PROJECT) and m != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check can fail


def test_each_layer_imports_only_the_layers_below_it():
    for module, imported in import_graph().items():
        package = module.split(".")[0]
        above = {m for m in imported if m.split(".")[0] not in LAYERS[package] | {package}}
        assert not above, f"{module} imports {sorted(above)}"
    for module, path in project_modules().items():  # the core runs without Prefect (the GPU image has none)
        if module.startswith("rlhf"):
            assert "prefect" not in {
                n.split(".")[0] for n in _imported_names(ast.parse(path.read_text()), module, False)
            }, module


def test_modules_and_functions_are_of_a_readable_size():
    long_modules, long_functions = [], []
    for path in sorted(p for d in (*PACKAGES, "tests", "docs", "scripts") for p in (PROJECT / d).rglob("*.py")):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(PROJECT)}: {len(text.splitlines())}")
        for node in ast.walk(ast.parse(text)):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.end_lineno - node.lineno >= MAX_FUNCTION_LINES
            ):
                long_functions.append(
                    f"{path.relative_to(PROJECT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1}"
                )
    assert not long_modules and not long_functions, (long_modules, long_functions)
