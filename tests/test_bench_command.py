"""`python scripts/bench.py <subcommand>`: one command whose benchmark modules import one way, without a cycle."""

import ast
import importlib.util

from helpers.data import REPO

BENCHMARKS = REPO / "scripts" / "benchmarks"


def bench_subcommands() -> dict:
    """bench.py's SUBCOMMANDS: name -> (module in scripts/benchmarks/, summary); importing bench.py runs nothing."""
    spec = importlib.util.spec_from_file_location("bench_command", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SUBCOMMANDS


def benchmark_imports() -> dict:
    """Each module of scripts/benchmarks/ -> the modules of the package it imports."""
    names = {path.stem for path in BENCHMARKS.glob("*.py")} - {"__init__"}
    graph = {}
    for name in names:
        tree = ast.parse((BENCHMARKS / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):  # import benchmarks.module
                imported.update(alias.name.removeprefix("benchmarks.") for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                package = node.level == 1 or node.module == "benchmarks"
                if package and node.module in (None, "benchmarks"):  # from . import module
                    imported.update(alias.name for alias in node.names)
                else:  # from .module import ..., from benchmarks.module import ...
                    imported.add((node.module or "").removeprefix("benchmarks."))
        graph[name] = imported & names
    return graph


def test_each_subcommand_has_its_own_module_and_none_imports_another():
    graph = benchmark_imports()
    subcommand_modules = {module for module, _ in bench_subcommands().values()}
    assert subcommand_modules <= graph.keys()
    for module in subcommand_modules:
        assert not graph[module] & subcommand_modules, f"{module} imports {graph[module] & subcommand_modules}"
    shared = graph.keys() - subcommand_modules
    for module in shared:
        assert not graph[module] & subcommand_modules, f"shared {module} imports a subcommand module"
    assert not list((REPO / "scripts").glob("bench_*.py")), "a benchmark outside the one command"


def test_the_benchmark_modules_import_without_a_cycle():
    graph = benchmark_imports()
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join([*path, module])}"
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
