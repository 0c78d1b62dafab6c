"""Hooks the config adds to the training loop: their state resumes exactly, and one may stop a run."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.runs import overrides_for

from metalearn.algorithms.protonet import ProtoNet
from metalearn.errors import MetalearnError
from metalearn.hooks import DivergenceGuard, Hook, LoopState


class LossHistory(Hook):
    """Keeps every step's loss; refuses to go on past `stop_after` steps (a stand-in for a divergence guard)."""

    def __init__(self, stop_after: float = math.inf):
        self.stop_after, self.losses, self.started_in = stop_after, [], None

    def start(self, context):
        self.started_in = context.run_dir

    def after_step(self, state, result, items, seconds):
        self.losses.append(result["loss"])
        if state.step > self.stop_after:
            raise MetalearnError(f"stopped by the hook at step {state.step}")

    def state_dict(self):
        return {"losses": list(self.losses)}

    def load_state_dict(self, saved):
        self.losses = list(saved["losses"])


HOOK = f"+hooks.history={{_target_:{__name__}.LossHistory}}"


def test_a_configured_hooks_state_resumes_exactly(cli, tiny_overrides, tmp_path):
    common = [*overrides_for("protonet", tiny_overrides), HOOK, "train.ckpt_every=1"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli("train", *common, "train.steps=3", f"hydra.run.dir={straight}", cwd=tmp_path)
    cli("train", *common, "train.steps=2", f"hydra.run.dir={split}", cwd=tmp_path)
    cli("train", f"resume={split}", "train.steps=3", cwd=tmp_path)  # the hook comes back from the saved overrides
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)["hooks"]["history"]["losses"]
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)["hooks"]["history"]["losses"]
    assert len(a) == 3 and a == b


def test_a_hook_can_stop_a_run_before_its_step_is_saved(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    guard = f"+hooks.guard={{_target_:{__name__}.LossHistory,stop_after:1}}"
    overrides = [*overrides_for("protonet", tiny_overrides), guard, "train.ckpt_every=1", f"hydra.run.dir={run}"]
    result = cli("train", *overrides, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "stopped by the hook at step 2" in result.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 1


def test_a_time_limit_ends_the_run_as_its_last_step_would_and_resume_goes_on(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = [*overrides_for("protonet", tiny_overrides), "train.steps=4", "train.val_every=3"]
    # a budget every step exceeds: the first step is the last, validated and saved
    result = cli("train", *overrides, "train.max_minutes=1e-6", f"hydra.run.dir={run}", cwd=tmp_path)
    assert "train.max_minutes=1e-06 reached at step 1 of 4" in result.stdout
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    assert (run / "checkpoints" / "best.pt").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("split") == "val"] == [1]
    cli("train", f"resume={run}", "train.max_minutes=null", cwd=tmp_path)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


def test_validation_counts_diverged_episodes_wrong_and_keeps_no_best_from_them(
    cli, tiny_overrides, tmp_path, monkeypatch
):
    """Of each validation's 4 episodes (scored one at a time) the 2nd and 4th have NaN predictions and the others
    are right: 50%, 2 diverged; class 0, the argmax of NaN, would have made it 60%. Their NaN loss keeps no best.pt."""
    calls = iter(range(1000))

    def half_diverged(self, episodes):
        if next(calls) % 2:
            return torch.full((*episodes.query_labels.shape, episodes.ways), math.nan)
        return F.one_hot(episodes.query_labels, episodes.ways).float()

    monkeypatch.setattr(ProtoNet, "predict", half_diverged)
    run = tmp_path / "run"
    overrides = [*overrides_for("protonet", tiny_overrides), "eval.batch_size=1", f"hydra.run.dir={run}"]
    shown = cli("train", *overrides, cwd=tmp_path)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert [(r["step"], r["accuracy"], r["diverged_episodes"], r["loss"]) for r in val] == [
        (2, 0.5, 2, None),
        (4, 0.5, 2, None),
    ]
    assert "step 4: 2 of 4 validation episodes diverged" in shown.stdout + shown.stderr
    assert not (run / "checkpoints" / "best.pt").exists()


def guard_after(step, loss, weight=1.0, run_dir=None):
    """DivergenceGuard after `step` of a run whose model is one weight of `weight` and whose loss was `loss`."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(weight)
    guard = DivergenceGuard()
    guard.start(SimpleNamespace(algo=SimpleNamespace(model=model), run_dir=run_dir))
    guard.after_step(LoopState(step=step, steps=10), {"loss": loss, "accuracy": 0.5}, items=2, seconds=0.1)


def test_the_divergence_guard_stops_at_a_loss_that_is_not_finite_though_the_weights_are(tmp_path):
    guard_after(3, 1.5, run_dir=tmp_path)  # all finite: the run goes on
    for loss in (math.nan, math.inf):
        with pytest.raises(MetalearnError, match=f"diverged at step 3: the training loss is {loss}, the weights are"):
            guard_after(3, loss, run_dir=tmp_path)
    with pytest.raises(MetalearnError, match="diverged at step 3: the loss is finite, and some weights are not"):
        guard_after(3, 1.5, weight=math.nan, run_dir=tmp_path)


def test_a_run_whose_loss_turns_nan_stops_before_that_step_is_saved(cli, tiny_overrides, tmp_path, monkeypatch):
    train_step, steps = ProtoNet.meta_train_step, iter(range(1, 1000))

    def nan_loss_at_step_2(self, episodes):
        result = train_step(self, episodes)  # a real step: the weights stay finite
        return {**result, "loss": math.nan} if next(steps) == 2 else result

    monkeypatch.setattr(ProtoNet, "meta_train_step", nan_loss_at_step_2)
    run = tmp_path / "run"
    overrides = [*overrides_for("protonet", tiny_overrides), "train.ckpt_every=1", f"hydra.run.dir={run}"]
    result = cli("train", *overrides, cwd=tmp_path, check=False)
    assert result.returncode == 1, result.stdout
    assert "metalearn: error: training diverged at step 2: the training loss is nan, the weights are finite" in (
        result.stderr
    )
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 1
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
