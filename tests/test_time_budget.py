"""train.max_minutes counts minutes of training: a run on a clock that jumps ten minutes at each step."""

import time
from types import SimpleNamespace

import pytest
import torch
from helpers.runs import overrides_for

import metalearn.hooks
from metalearn.algorithms.protonet import ProtoNet

MINUTES_PER_STEP = 10


@pytest.fixture
def ten_minute_steps(monkeypatch):
    """The loop's clock (LoopState.elapsed) runs MINUTES_PER_STEP minutes ahead after each training step; the
    real seconds a tiny step takes are far too few to reach the next multiple of it."""
    skipped = [0.0]
    train_step = ProtoNet.meta_train_step

    def slow_train_step(self, episodes):
        result = train_step(self, episodes)
        skipped[0] += MINUTES_PER_STEP * 60
        return result

    monkeypatch.setattr(ProtoNet, "meta_train_step", slow_train_step)
    monkeypatch.setattr(metalearn.hooks, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + skipped[0]))


def train_for(cli, tiny_overrides, tmp_path, max_minutes):
    run = tmp_path / "run"
    overrides = [*overrides_for("protonet", tiny_overrides), "train.steps=4", "train.val_every=4"]
    out = cli("train", *overrides, f"train.max_minutes={max_minutes}", f"hydra.run.dir={run}", cwd=tmp_path).stdout
    return out, torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]


def test_a_budget_of_25_minutes_ends_the_run_after_its_third_ten_minute_step(
    cli, tiny_overrides, tmp_path, ten_minute_steps
):
    out, step = train_for(cli, tiny_overrides, tmp_path, 25)
    assert "train.max_minutes=25 reached at step 3 of 4" in out  # 20 minutes after step 2, 30 after step 3
    assert step == 3


def test_a_budget_the_steps_do_not_reach_runs_every_step(cli, tiny_overrides, tmp_path, ten_minute_steps):
    out, step = train_for(cli, tiny_overrides, tmp_path, 45)  # 4 steps: 40 minutes
    assert "reached" not in out
    assert step == 4
