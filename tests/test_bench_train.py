"""`scripts/bench.py train`: the window it measures and the FLOPs it counts are what it says.

The timings themselves live in the script; here the measured window must leave the warm-up steps out and
count every later one, the FLOP count must be per task (per image for a classifier's batch) and see every
inner step, and the hook must reach a real `metalearn train` process.
"""

import json
from types import SimpleNamespace

import pytest
from helpers.data import REPO

from metalearn.hooks import LoopState


@pytest.fixture
def training(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from benchmarks import training

    return training


def started_window(training, path, skip: int, amp: bool):
    """A StepWindow started on a run whose algorithm computes in bf16 (`amp`) or not and counts tasks."""
    window = training.StepWindow(str(path), skip=skip)
    window.start(SimpleNamespace(algo=SimpleNamespace(fast_paths=SimpleNamespace(amp=amp), throughput_unit="tasks")))
    return window


def test_the_window_leaves_out_the_warmup_and_counts_every_later_step(training, tmp_path):
    path = tmp_path / "window.json"
    window = started_window(training, path, skip=2, amp=True)
    state = LoopState(step=0, steps=6)
    for step in range(1, 7):
        state.step = step
        window.after_step(state, {"loss": 1.0, "accuracy": 0.5}, items=step, seconds=0.25 * step)
        assert path.is_file() == (step == 6)  # written once, at the last step
    measured = json.loads(path.read_text())
    assert measured["steps"] == 4 and measured["items"] == 3 + 4 + 5 + 6
    assert measured["step_seconds"] == pytest.approx(0.25 * (3 + 4 + 5 + 6))
    assert (
        measured["amp"] is True and measured["unit"] == "tasks" and measured["user"] >= 0 and measured["peak_mib"] > 0
    )


def test_the_window_closes_at_a_time_limits_last_step(training, tmp_path):
    path = tmp_path / "window.json"
    window = started_window(training, path, skip=1, amp=False)
    state = LoopState(step=0, steps=1000)
    for step in range(1, 4):
        state.step, state.final = step, step == 3  # train.max_minutes ends the run at step 3
        window.after_step(state, {"loss": 1.0, "accuracy": 0.5}, items=2, seconds=0.1)
    assert json.loads(path.read_text())["steps"] == 2


def test_flops_are_per_task_and_see_every_inner_step(training, tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith(("train.", "algo."))]
    one, three = (training.flops_per_item([*base, "algo=maml", f"algo.inner_steps={n}"]) for n in (1, 3))
    assert three > 1.8 * one > 0  # two more inner steps: forward, backward and their second-order terms
    # a classifier's batch: per image, whatever the batch size
    small, large = (training.flops_per_item([*base, "algo=finetune", f"algo.batch_size={n}"]) for n in (4, 8))
    assert small == pytest.approx(large, rel=1e-6)


def test_a_row_measures_a_real_training_process(training, tiny_overrides, tmp_path):
    base = [o for o in tiny_overrides if not o.startswith("train.")] + ["algo=fomaml", "train.meta_batch_size=3"]
    args = SimpleNamespace(seconds=2.0, warmup=2)
    window = training.train_row(base, tmp_path / "fomaml", args)
    assert window["steps"] >= 1 and window["items"] == 3 * window["steps"]  # tasks, after the 2 left out
    assert 0 < window["step_seconds"] <= window["wall"] and window["threads"] >= 1
