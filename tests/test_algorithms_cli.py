"""Every algorithm through the CLI on the tiny generated Omniglot: train, resume, evaluate, ensemble."""

import json
import re

import torch
from helpers.runs import overrides_for, train_resume_eval


def test_extending_a_reptile_run_keeps_its_schedule_or_says_how(cli, tiny_overrides, tmp_path):
    """The outer step size anneals over train.steps as the run started; a longer resume cannot restart it."""
    run = tmp_path / "run"
    reptile = [o for o in overrides_for("reptile", tiny_overrides) if not o.startswith("algo.anneal_steps")]
    cli("train", *reptile, "train.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["algo"]["anneal_steps"] == 2
    refused = cli("train", f"resume={run}", "train.steps=4", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "algo.anneal_steps=4" in refused.stderr and "algo.meta_step_final" in refused.stderr
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2  # nothing lost
    # going on at a final step size: the schedule that ended at step 2 is kept, eps stays at 0.5
    cli("train", f"resume={run}", "train.steps=4", "algo.meta_step_final=0.5", cwd=tmp_path)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["algo"]
    assert state["step"] == 4 and state["anneal_steps"] == 2


def test_metasgd_checkpoint_holds_the_learned_rates(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    cli("train", *overrides_for("metasgd", tiny_overrides), "train.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["algo"]
    rates = state["inner_lr"]
    assert set(rates) == set(state["model"]) - {k for k in state["model"] if "running" in k}
    assert all(r.shape == state["model"][k].shape for k, r in rates.items())


def test_finetune_then_distill_from_it(cli, tiny_overrides, tmp_path):
    teacher = train_resume_eval(cli, overrides_for("finetune", tiny_overrides), tmp_path, "finetune")
    head = torch.load(teacher / "checkpoints" / "last.pt", weights_only=True)["algo"]["model"]["head.weight"]
    assert head.shape[0] == 12  # one output per meta-train class of the tiny split
    student = [*overrides_for("finetune", tiny_overrides), f"algo.teacher={teacher}"]
    student[0] = "algo=distill"
    train_resume_eval(cli, student, tmp_path, "distill")


def test_distill_refuses_a_teacher_that_is_not_a_classifier(cli, tiny_overrides, tmp_path):
    maml_run = tmp_path / "maml"
    cli("train", *tiny_overrides, "train.steps=1", f"hydra.run.dir={maml_run}", cwd=tmp_path)
    student = [*overrides_for("finetune", tiny_overrides), f"algo.teacher={maml_run}", "train.steps=1"]
    student[0] = "algo=distill"
    result = cli("train", *student, f"hydra.run.dir={tmp_path / 'student'}", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is a maml run; the teacher must be a finetune or distill run" in result.stderr


def test_distill_needs_a_teacher(cli, tiny_overrides, tmp_path):
    student = overrides_for("finetune", tiny_overrides)
    student[0] = "algo=distill"
    result = cli("train", *student, cwd=tmp_path, check=False)
    assert result.returncode != 0 and "algo.teacher" in result.stderr and "Traceback" not in result.stderr


def test_ensemble_of_a_seed_sweep(cli, tiny_overrides, tmp_path):
    """Three seeds of one sweep: the ensemble line and each member's line, members scored as alone."""
    overrides = [o for o in overrides_for("protonet", tiny_overrides) if not o.startswith("train.steps")]
    cli("train", "-m", "seed=0,1,2", "train.steps=2", *overrides, "hydra.sweep.dir=sweep", cwd=tmp_path)
    runs = sorted((tmp_path / "sweep").glob("*-protonet-seed*"))
    assert len(runs) == 3
    out = cli("eval", f"run=[{','.join(map(str, runs))}]", cwd=tmp_path).stdout.strip().splitlines()
    assert len(out) == 4
    for run, line in zip(runs, out, strict=False):
        assert line.startswith(f"{run}: test accuracy")
    assert re.fullmatch(
        r"ensemble of 3: test accuracy \d+\.\d\d% ± \d+\.\d\d \(10 episodes, omniglot 5-way 1-shot, "
        r"mean class probabilities\)",
        out[3],
    )
    alone = cli("eval", f"run={runs[1]}", cwd=tmp_path).stdout.strip()
    assert alone == out[1].split(": ", 1)[1]
    records = [json.loads((run / "evals.jsonl").read_text().splitlines()[0]) for run in runs]
    assert all(r["ensemble"]["members"] == [str(run) for run in runs] for r in records)
    assert len({r["ensemble"]["accuracy"] for r in records}) == 1


def test_ensemble_members_must_share_the_task(cli, tiny_overrides, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    overrides = overrides_for("protonet", tiny_overrides)
    cli("train", *overrides, "train.steps=1", f"hydra.run.dir={a}", cwd=tmp_path)
    cli("train", *overrides, "train.steps=1", "task.ways=3", f"hydra.run.dir={b}", cwd=tmp_path)
    result = cli("eval", f"run=[{a},{b}]", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "task.ways (3 vs 5)" in result.stderr
    assert not (a / "evals.jsonl").exists()
    ok = cli("eval", f"run=[{a},{b}]", "task.ways=5", cwd=tmp_path).stdout
    assert "ensemble of 2" in ok


def test_distill_inherits_the_finetune_settings():
    """distill composes finetune's values (its schema, merged after them, must not reset any)."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from metalearn.config.schema import register_schemas

    register_schemas()
    with initialize_config_module(config_module="metalearn.conf", version_base="1.3"):
        finetune = OmegaConf.to_container(compose("train", overrides=["algo=finetune"]))
        distill = OmegaConf.to_container(compose("train", overrides=["algo=distill", "algo.teacher=x"]))
    own = ("name", "_target_")
    assert {k: v for k, v in distill["algo"].items() if k in finetune["algo"] and k not in own} == {
        k: v for k, v in finetune["algo"].items() if k not in own
    }
    assert distill["train"] == finetune["train"]
