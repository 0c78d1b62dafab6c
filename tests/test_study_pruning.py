"""A study's pruner stops a trial at a validation step: the run is validated, saved and resumable, the trial
PRUNED with the step it reached, and `metalearn report` says so; the same through joblib's processes."""

import csv
import json

import pytest
import torch
import yaml
from helpers.runs import overrides_for

optuna = pytest.importorskip("optuna", reason="the sweep extra: pip install '.[sweep]'")

# Optuna's ThresholdPruner stops any trial from step 3 on (accuracy is below 1.1): deterministic. A trial of
# 3 steps ends at its last step, which no pruner stops; one of 8 steps is stopped at its validation of step 4.
PRUNE_FROM_STEP_3 = [
    "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
    "+hydra.sweeper.pruner.lower=1.1",
    "+hydra.sweeper.pruner.n_warmup_steps=3",
]


def study(tiny_overrides, tmp_path, *extra):
    overrides = overrides_for("protonet", [o for o in tiny_overrides if not o.startswith("train.steps")])
    return [
        "train",
        "-m",
        "hparams_search=protonet",
        "task.train.ways=5",
        "algo.lr_decay=0.5",
        "algo.outer_lr=0.001",
        "train.steps=choice(3,8)",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.study_name=tiny",
        "hydra/sweeper/sampler=grid",  # each number of steps once
        *PRUNE_FROM_STEP_3,
        *overrides,
        "train.ckpt_every=100",  # only the pruned step (and the last) save last.pt
        f"hydra.sweep.dir={tmp_path / 'study'}",
        *extra,
    ]


def val_accuracies(run) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["accuracy"] for r in records if r["split"] == "val"}


def trials_by_steps(tmp_path):
    loaded = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'study' / 'study.db'}")
    return {t.params["train.steps"]: t for t in loaded.trials}


def test_a_pruned_trial_stops_at_a_validation_saved_and_recorded_pruned(cli, tiny_overrides, tmp_path):
    cli(*study(tiny_overrides, tmp_path), cwd=tmp_path)
    trials = trials_by_steps(tmp_path)
    completed, pruned = trials[3], trials[8]
    runs = {n: tmp_path / "study" / f"trial{trials[n].number}" for n in (3, 8)}

    assert completed.state == optuna.trial.TrialState.COMPLETE
    assert completed.value == max(val_accuracies(runs[3]).values())
    assert pruned.state == optuna.trial.TrialState.PRUNED and pruned.user_attrs["pruned_at_step"] == 4
    # every validation went to the trial, at its step, and the run stopped at the first one the pruner refused
    assert pruned.intermediate_values == val_accuracies(runs[8]) and sorted(pruned.intermediate_values) == [2, 4]
    assert completed.intermediate_values == val_accuracies(runs[3])
    assert torch.load(runs[8] / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert json.loads((runs[8] / "trial.json").read_text())["state"] == "pruned"
    assert "pruned by the study's ThresholdPruner at step 4" in (runs[8] / "train.log").read_text()
    summary = yaml.safe_load((tmp_path / "study" / "optimization_results.yaml").read_text())
    assert summary["trials"] == {"complete": 1, "pruned": 1}

    cli("report", "study", cwd=tmp_path)
    with open(tmp_path / "study" / "report.csv") as handle:
        statuses = {row["group"]: row["status"] for row in csv.DictReader(handle)}
    assert sorted(statuses.values()) == ["done, not evaluated", "pruned at step 4"]

    # a trial is a run like any other: it evaluates (its preset, which chose the algorithm, replayed)
    cli("eval", f"run={runs[3]}", cwd=tmp_path)
    assert json.loads((runs[3] / "evals.jsonl").read_text().splitlines()[-1])["checkpoint"] == "best.pt"

    # a pruned run is resumable: outside the study it trains on to its last step
    cli("train", f"resume={runs[8]}", cwd=tmp_path)
    assert torch.load(runs[8] / "checkpoints" / "last.pt", weights_only=True)["step"] == 8
    cli("report", "study", cwd=tmp_path)
    with open(tmp_path / "study" / "report.csv") as handle:
        assert "pruned at step 4" not in handle.read()


@pytest.mark.parametrize(
    "launcher",
    [
        pytest.param(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2"], id="joblib"),
        # each trial a job of two processes: rank 0 asks the pruner, and every rank stops at the same step
        pytest.param(
            ["hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", "hydra.sweeper.n_jobs=2"],
            id="submitit-two-tasks",
        ),
    ],
)
def test_trials_in_other_processes_are_pruned_through_the_storage(cli, tiny_overrides, tmp_path, launcher):
    pytest.importorskip(
        f"hydra_plugins.hydra_{launcher[0].split('=')[1].split('_')[0]}_launcher", reason="the sweep extra"
    )
    cli(*study(tiny_overrides, tmp_path, *launcher), cwd=tmp_path)
    trials = trials_by_steps(tmp_path)
    assert trials[3].state == optuna.trial.TrialState.COMPLETE
    assert trials[8].state == optuna.trial.TrialState.PRUNED and sorted(trials[8].intermediate_values) == [2, 4]
    run = tmp_path / "study" / f"trial{trials[8].number}"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    for output in (tmp_path / "study" / ".submitit").glob("*/*_log.out"):  # every process of every job
        assert "[ERROR]" not in output.read_text(), output.read_text()[-2000:]


def test_a_study_in_memory_is_not_pruned_from_other_processes_and_says_what_to_do(cli, tiny_overrides, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the sweep extra")
    command = study(tiny_overrides, tmp_path, "hydra/launcher=joblib", "hydra.sweeper.storage=null")
    result = cli(*command, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "hydra.sweeper.storage=null keeps it in this process's memory: give it a storage" in result.stderr
    assert not (tmp_path / "study").exists()

    # without a pruner, such trials report only their results, which the sweeper tells the study
    unpruned = [c for c in command if not c.startswith(("hydra.sweeper.pruner", "+hydra.sweeper.pruner"))]
    cli(*unpruned, cwd=tmp_path)
    summary = yaml.safe_load((tmp_path / "study" / "optimization_results.yaml").read_text())
    assert summary["trials"] == {"complete": 2} and summary["storage"] is None


def test_a_pruner_named_as_a_value_is_refused_with_the_group_to_choose(cli, tiny_overrides, tmp_path):
    command = [c for c in study(tiny_overrides, tmp_path) if not c.startswith(("hydra.sweeper.pruner", "+hydra"))]
    result = cli(*command, "hydra.sweeper.pruner=hyperband", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "choose one with hydra/sweeper/pruner=<name>" in result.stderr
