"""`scripts/bench.py memory`: its implementations are the ones it names, and a row carries its figures.

Only the wiring is checked here; the memory and speed figures themselves live in the script.
"""

from types import SimpleNamespace

import pytest
from helpers.data import REPO


@pytest.fixture
def bench(monkeypatch):
    """The code behind `bench.py memory`; its rows are built and timed by the turns module, shared with `compare`."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from benchmarks import memory, turns

    return SimpleNamespace(memory=memory, turns=turns)


def tiny_row(tmp_path, impl: str) -> dict:
    """5-way 1-shot second-order MAML, 2 inner steps, 2 tasks; random images (no Omniglot under data_root)."""
    return {
        "algo": "maml",
        "setting": "5w1s",
        "ways": 5,
        "shots": 1,
        "queries": 2,
        "inner_steps": 2,
        "inner_lr": 0.4,
        "meta_batch": 2,
        "order": "second",
        "data_root": str(tmp_path),
        "iters": 1,
        "impls": [impl],
        "figure": "step",
    }


def test_memory_rows_measure_plain_and_checkpointed_second_order_maml(bench, tmp_path, monkeypatch):
    checkpointed_impl = bench.turns.CHECKPOINTED
    plain = bench.turns.build("metalearn", tiny_row(tmp_path, "metalearn"))
    checkpointed = bench.turns.build(checkpointed_impl, tiny_row(tmp_path, checkpointed_impl))
    assert not plain.first_order and not checkpointed.first_order
    assert (plain.checkpoint_inner, checkpointed.checkpoint_inner) == (False, True)
    assert (plain.inner_steps, checkpointed.inner_steps) == (2, 2)
    assert checkpointed_impl in bench.memory.MEMORY_IMPLS

    # each row timed in a fresh process, as `bench.py memory` times it: `bench.py memory --group <row>`
    monkeypatch.setitem(bench.memory.MEMORY_SETTINGS, "tiny", (5, 1, 2, 0.4))  # ways, shots, queries, inner_lr
    (row,) = bench.memory.memory_rows(["tiny"], [2], 2, 1, str(tmp_path), [checkpointed_impl])
    assert row["impl"] == checkpointed_impl and row["inner_steps"] == 2 and row["queries"] == 2
    assert row["tasks_per_s"] > 0 and row["baseline_mem_mib"] > 0 and row["peak_mem_mib"] > 0
    assert row["figure"] == "memory" and row["growth_mem_mib"] == row["peak_mem_mib"] - row["baseline_mem_mib"]
    assert row["iterations"] == 1
