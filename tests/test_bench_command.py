"""`python scripts/bench.py <subcommand>`: one command whose benchmark modules import one way, without a cycle."""

import ast
import importlib.util
import json

import torch
from helpers.data import REPO

from metalearn.device import native_bf16

BENCHMARKS = REPO / "scripts" / "benchmarks"


def bench_command():
    """scripts/bench.py as a module; importing it runs nothing."""
    spec = importlib.util.spec_from_file_location("bench_command", REPO / "scripts" / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_subcommands() -> dict:
    """bench.py's SUBCOMMANDS: name -> (module in scripts/benchmarks/, summary)."""
    return bench_command().SUBCOMMANDS


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


def test_fidelity_compares_each_precision_with_float64_on_the_same_batch(monkeypatch, tmp_path, capsys):
    """`bench.py fidelity` on random images: float32 agrees with float64 to rounding, bf16 visibly less, and the
    comparison tells a different update apart."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from benchmarks import fidelity
    from benchmarks.common import random_images

    rows_file = tmp_path / "rows.json"
    options = ["--data-root", str(tmp_path), "--algos", "maml", "protonet", "--tasks", "1", "--steps", "1", "--quick"]
    bench_command().main(["fidelity", *options, "--json", str(rows_file)])
    rows = json.loads(rows_file.read_text())
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("CPU: ") and torch.__version__ in printed[0]

    bf16 = f"bf16 {'native' if native_bf16(torch.device('cpu'))[0] else 'emulated'}"
    assert [(row["algo"], row["steps"], row["precision"]) for row in rows] == [
        ("maml", 1, "float32"),
        ("maml", 1, bf16),
        ("protonet", None, "float32"),
        ("protonet", None, bf16),
    ]
    for row in rows:
        assert any(line.startswith(row["algo"]) and row["precision"] in line for line in printed)
        assert not row["worst_tensor"].endswith(".0.bias")  # a conv bias before BatchNorm: no update in float64
        assert 0 < row["floor"] < 0.99999  # the float64 update at bf16-rounded weights moves, a little
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["accuracy64"] <= 1
    for float32, low in (rows[0], rows[1]), (rows[2], rows[3]):
        assert float32["cosine"] > 0.999 and float32["worst_cosine"] > 0.999
        assert 0 < float32["rel_err"] < 1e-3  # computed in float32, not float64 compared with itself
        assert abs(float32["norm_ratio"] - 1) < 1e-3
        assert low["rel_err"] > 100 * float32["rel_err"]  # bf16 autocast was on
    assert rows[2]["same"] >= 0.9  # protonet's nearest prototypes (MAML's 10 test-time steps can flip a few)

    # A broken comparison fails: the float64 update of another batch, or with one tensor turned around
    split = random_images(100, 20, (1, 28, 28))
    shared = fidelity.Shared(torch.device("cpu"), split, split, split.num_classes)
    setting = fidelity.Setting("maml", 1, "5w1s", ("experiment=maml_omniglot_5w1s",))
    algo, cfg = fidelity.build(setting, fidelity.FLOAT64, shared, torch.float64, None)
    sampler, _ = fidelity.samplers(cfg, shared, torch.float64, 2, True)
    first, second = fidelity.directions(algo, sampler, 1, 2, torch.device("cpu"), False)
    assert fidelity.compare(first, first)["cosine"] > 0.999999
    assert fidelity.compare(second, first)["cosine"] < 0.999
    turned = {**first, "head.weight": -first["head.weight"]}
    broken = fidelity.mean_comparison([turned], [first])
    assert broken["cosine"] < 0.999 and broken["worst_tensor"] == "head.weight" and broken["worst_cosine"] < -0.999
