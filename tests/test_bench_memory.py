"""scripts/bench.py --memory: its implementations are the ones it names, and a row carries its figures.

Only the wiring is checked here; the memory and speed figures themselves live in the script.
"""

import pytest
from helpers.data import REPO


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))  # bench imports bench_step
    import bench

    return bench


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


def test_memory_rows_measure_plain_and_checkpointed_second_order_maml(bench, tmp_path):
    plain = bench.build("metalearn", tiny_row(tmp_path, "metalearn"))
    checkpointed = bench.build(bench.CHECKPOINTED, tiny_row(tmp_path, bench.CHECKPOINTED))
    assert not plain.first_order and not checkpointed.first_order
    assert (plain.checkpoint_inner, checkpointed.checkpoint_inner) == (False, True)
    assert (plain.inner_steps, checkpointed.inner_steps) == (2, 2)

    (row,) = bench.run_group(tiny_row(tmp_path, bench.CHECKPOINTED))
    assert row["impl"] == bench.CHECKPOINTED and row["inner_steps"] == 2 and row["queries"] == 2
    assert row["tasks_per_s"] > 0 and row["baseline_mem_mib"] > 0 and row["peak_mem_mib"] > 0
