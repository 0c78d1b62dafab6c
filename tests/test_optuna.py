"""An Optuna study (hparams_search=...): each trial is a run folder; its best validation accuracy is the objective."""

import csv
import json
import math

import pytest
import yaml

from helpers.runs import overrides_for

optuna = pytest.importorskip("optuna", reason="the sweep extra: pip install '.[sweep]'")
pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the sweep extra: pip install '.[sweep]'")

RATES = (0.001, 0.003, 1e30)
DIVERGING = 1e30  # Adam steps every weight by about the rate: the next loss is not finite


def best_val_accuracy(run) -> float:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return max(r["accuracy"] for r in lines if r["split"] == "val" and math.isfinite(r["loss"]))


def trial_lr(run) -> float:
    overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    return float(next(o.split("=", 1)[1] for o in overrides if o.startswith("algo.outer_lr=")))


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # enqueue_trial
def test_a_study_scores_each_trial_by_its_best_validation_and_fails_a_diverged_one(cli, tiny_overrides, tmp_path):
    overrides = overrides_for("protonet", [o for o in tiny_overrides if not o.startswith("train.steps")])
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    # The study exists in its file before the sweep, with one trial queued per rate: the sweep
    # continues it (as a restarted or second worker would) and runs each rate once.
    queued = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    for lr in RATES:
        queued.enqueue_trial({"algo.outer_lr": lr})
    result = cli(
        "train",
        "-m",
        "hparams_search=protonet",
        f"algo.outer_lr=choice({','.join(map(str, RATES))})",
        "algo.lr_decay=0.5",
        "hydra.sweeper.n_trials=3",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=tiny",
        "train.steps=4",
        *overrides,
        "hydra.sweep.dir=study",
        cwd=tmp_path,
    )
    runs = sorted(p for p in (tmp_path / "study").iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["trial0", "trial1", "trial2"]
    by_lr = {trial_lr(run): run for run in runs}
    assert sorted(by_lr) == sorted(RATES)

    diverged = by_lr[DIVERGING]
    assert "training diverged at step" in (diverged / "train.log").read_text()

    study = optuna.load_study(study_name="tiny", storage=storage)
    assert len(study.trials) == 3
    trials = {t.params["algo.outer_lr"]: t for t in study.trials}
    assert trials[DIVERGING].state == optuna.trial.TrialState.FAIL and trials[DIVERGING].value is None
    for lr in RATES[:2]:
        assert trials[lr].state == optuna.trial.TrialState.COMPLETE
        assert trials[lr].value == pytest.approx(best_val_accuracy(by_lr[lr]), abs=1e-12)

    summary = yaml.safe_load((tmp_path / "study" / "optimization_results.yaml").read_text())
    assert summary["best_value"] == pytest.approx(max(trials[lr].value for lr in RATES[:2]))
    assert result.returncode == 0  # a failed trial does not fail the study

    cli("report", "study", cwd=tmp_path)
    with open(tmp_path / "study" / "report.csv") as handle:
        statuses = {row["status"] for row in csv.DictReader(handle)}
    assert statuses == {"done, not evaluated", "failed: training diverged at step 2"}


def test_a_study_no_trial_completes_ends_on_one_line_and_each_log_says_why(cli, tiny_overrides, tmp_path):
    overrides = overrides_for("protonet", [o for o in tiny_overrides if not o.startswith("train.")])
    result = cli(
        "train",
        "-m",
        "hparams_search=protonet",
        "task.train.ways=5",
        "hydra.sweeper.n_trials=2",
        "train.steps=4",
        "train.val_every=5",  # no validation would score a trial
        *overrides,
        "hydra.sweep.dir=study",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "metalearn: error: no trial of the study completed; each trial's train.log under study" in result.stderr
    for trial in ("trial0", "trial1"):
        log = (tmp_path / "study" / trial / "train.log").read_text()
        assert "train.val_every=5 is more than train.steps=4, so no validation would run" in log


def test_a_study_without_multirun_is_refused_before_anything_runs(cli, tmp_path):
    result = cli("train", "hparams_search=maml", cwd=tmp_path, check=False)
    assert result.returncode == 1 and not (tmp_path / "runs").exists()
    assert result.stderr.strip() == (
        "metalearn: error: hparams_search=maml runs an Optuna study, a sweep: add -m "
        "(metalearn train -m hparams_search=maml ...)."
    )
