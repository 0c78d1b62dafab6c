"""Hooks the config adds to the training loop: their state resumes exactly, and one may stop a run."""

import json
import math

import torch

from helpers.runs import overrides_for
from metalearn.errors import MetalearnError
from metalearn.hooks import Hook


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
