"""An Optuna study (hparams_search=...): each trial is a run folder; its best validation accuracy is the objective."""

import contextlib
import csv
import json
import math
import os
import random
import socket
import sqlite3
import subprocess
import sys

import pytest
import yaml
from helpers.runs import overrides_for

optuna = pytest.importorskip("optuna", reason="the sweep extra: pip install '.[sweep]'")

from hydra_plugins.metalearn_study.study_storage import OWNER  # noqa: E402

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
    # each queued trial records the process that took it, so a later start tells it from a stale one
    assert [t.system_attrs[OWNER] for t in study.trials] == [{"host": socket.gethostname(), "pid": os.getpid()}] * 3
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


def study_command(tiny_overrides, storage, *extra, trials=1):
    overrides = overrides_for("protonet", [o for o in tiny_overrides if not o.startswith("train.steps")])
    return [
        "train",
        "-m",
        "hparams_search=protonet",
        f"hydra.sweeper.n_trials={trials}",
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=tiny",
        "task.train.ways=5",
        "train.steps=2",
        *overrides,
        "hydra.sweep.dir=study",
        *extra,
    ]


def other_programs_database(path):
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        db.execute("INSERT INTO notes (text) VALUES ('keep me')")
        db.commit()


def table_of_optunas_name(path):
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE studies (name TEXT)")
        db.commit()


def cut_study_file(path):
    optuna.create_study(study_name="tiny", storage=f"sqlite:///{path}", direction="maximize")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGED = {
    "random bytes": (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "is not an SQLite database"),
    "text": (lambda p: p.write_text("trial,value\n0,0.5\n" * 100), "is not an SQLite database"),
    "cut short": (cut_study_file, "is not an SQLite database (database disk image is malformed)"),
    "another program's": (other_programs_database, "is the SQLite database of another program (tables notes)"),
    "a table of Optuna's name": (table_of_optunas_name, "is the SQLite database of another program (tables studies)"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_storage_file_that_is_no_study_ends_on_one_line_and_stays_as_it_was(cli, tiny_overrides, tmp_path, damage):
    write, expected = DAMAGED[damage]
    path = tmp_path / "study.db"
    write(path)
    before = path.read_bytes()
    result = cli(*study_command(tiny_overrides, f"sqlite:///{path}"), cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"metalearn: error: the study's storage sqlite:///{path} {expected}" in result.stderr
    assert "hydra.sweeper.storage" in result.stderr  # what to do
    assert path.read_bytes() == before and not (tmp_path / "study").exists()


def test_a_storage_that_cannot_be_opened_and_a_study_of_another_direction_end_on_one_line(
    cli, tiny_overrides, tmp_path
):
    missing = f"sqlite:///{tmp_path / 'no-such-folder' / 'study.db'}"
    result = cli(*study_command(tiny_overrides, missing), cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"metalearn: error: the study's storage {missing} cannot be opened (" in result.stderr

    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="tiny", storage=storage, direction="minimize")
    result = cli(*study_command(tiny_overrides, storage), cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"metalearn: error: study tiny in {storage} optimizes in another direction" in result.stderr


def finished_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def asked_by(study, trial, pid: int) -> None:
    """What the sweeper records in a trial it starts: the process that asked for it."""
    study._storage.set_trial_system_attr(trial._trial_id, OWNER, {"host": socket.gethostname(), "pid": pid})


def test_trials_a_stopped_process_left_running_are_failed_when_the_study_starts_again(cli, tiny_overrides, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="tiny", storage=storage, direction="maximize")
    killed = study.ask()  # asked through Optuna itself, which records no process
    gone = study.ask()
    asked_by(study, gone, finished_process_id())
    reused = study.ask()  # its process id now this one's: a container started again gives the same ids
    asked_by(study, reused, os.getpid())
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) as worker:
        try:
            alive = study.ask()  # another worker's trial, still running
            asked_by(study, alive, worker.pid)
            # n_trials is the study's size: the four trials asked before count, so this sweeper adds one
            result = cli(*study_command(tiny_overrides, storage, trials=5), cwd=tmp_path)
        finally:
            worker.kill()
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    states = {t.number: t.state for t in trials}
    assert states[killed.number] == states[gone.number] == states[reused.number] == optuna.trial.TrialState.FAIL
    assert states[alive.number] == optuna.trial.TrialState.RUNNING
    assert [t.state for t in trials[4:]] == [optuna.trial.TrialState.COMPLETE]  # the one new trial ran
    assert trials[4].system_attrs[OWNER] == {"host": socket.gethostname(), "pid": os.getpid()}
    output = result.stdout + result.stderr
    assert f"trial {killed.number} of study tiny was left running by a process that stopped" in output
    assert f"trial {gone.number} of study tiny was left running by a process that stopped" in output
