"""Run folders written before the component redesign still evaluate and resume exactly.

tests/fixtures/runs-before-redesign holds tiny runs made by metalearn 0.1.0 with the keys of
that time in their .hydra/overrides.yaml; each is copied, evaluated, then resumed one step and
compared with a run made now with today's keys, resumed one step from the same checkpoint: the
old keys must give the same run. (The checkpoint, not a run trained now, is the common start: a
step's float rounding may change between versions, e.g. when tasks moved onto threads.)
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers.runs import assert_same_state
from omegaconf import OmegaConf

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "runs-before-redesign"


def data_here(tiny_data) -> list:
    """The fixture runs name the tiny data where it was made; point them at this session's copy."""
    return [
        f"data.root={tiny_data['root']}",
        f"data.split={tiny_data['split']}",
        f"data.cache_dir={tiny_data['cache']}",
    ]


@pytest.mark.parametrize("algo", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_a_run_from_before_evaluates_and_resumes_exactly(cli, tiny_data, tmp_path, algo):
    run = tmp_path / algo
    shutil.copytree(FIXTURES / algo, run)
    out = cli("eval", f"run={run}", *data_here(tiny_data), cwd=tmp_path).stdout
    assert "(10 episodes, omniglot 5-way 1-shot, best.pt)" in out
    assert json.loads((run / "evals.jsonl").read_text())["step"] == 2

    cli("train", f"resume={run}", "train.steps=3", *data_here(tiny_data), cwd=tmp_path)
    saved = [o for o in (run / ".hydra" / "overrides.yaml").read_text().splitlines() if o.startswith("- ")]
    made_now = tmp_path / f"{algo}-now"
    overrides = [
        o[2:]
        for o in saved
        if o[2:].split("=")[0] not in ("data.root", "data.split", "data.cache_dir", "train.steps", "resume")
    ]
    cli("train", *overrides, *data_here(tiny_data), "train.steps=2", f"hydra.run.dir={made_now}", cwd=tmp_path)
    shutil.copy(FIXTURES / algo / "checkpoints" / "last.pt", made_now / "checkpoints" / "last.pt")
    cli("train", f"resume={made_now}", "train.steps=3", *data_here(tiny_data), cwd=tmp_path)
    resumed = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    straight = torch.load(made_now / "checkpoints" / "last.pt", weights_only=True)
    assert resumed["step"] == straight["step"] == 3
    assert_same_state(resumed["algo"], straight["algo"])


def test_keys_from_before_the_redesign_still_work_on_the_command_line(cli):
    old = ["data.ways=3", "algo.train_shots=4", "data.replay.size=7", "algo.outer_lr=0.5", "algo.outer_lr_final=0.1"]
    result = cli("train", "--cfg", "job", "experiment=reptile_omniglot_5w1s", *old)
    cfg = OmegaConf.create(result.stdout)
    assert (cfg.task.ways, cfg.task.train.shots, cfg.train.replay.size) == (3, 4, 7)
    assert (cfg.algo.meta_step, cfg.algo.meta_step_final) == (0.5, 0.1)
    assert "data.ways is now task.ways" in result.stderr and "algo.outer_lr is now algo.meta_step" in result.stderr
    # outer_lr keeps its meaning (the Adam rate) for every other algorithm
    assert (
        OmegaConf.create(cli("train", "--cfg", "job", "algo=maml", "algo.outer_lr=0.01").stdout).algo.outer_lr == 0.01
    )
