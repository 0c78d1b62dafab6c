"""A sweep run again into its folder finishes what is unfinished (a run that completed is skipped, one with a
checkpoint resumes, a missing one starts), and a SLURM job stopped by its time limit requeues itself and
resumes exactly (submitit's local executor, the signal sent by the run itself)."""

import os
import signal
from pathlib import Path

import pytest
import torch
from helpers.runs import assert_same_state, overrides_for

from metalearn.hooks import Hook


class StopOnce(Hook):
    """Sends this process `signum` after `step` of the run with eval.episodes=`episodes`, once (a marker file)."""

    def __init__(self, step: int, episodes: int, marker: str, signum: str = "SIGTERM"):
        self.step, self.episodes, self.marker, self.signum = step, episodes, Path(marker), getattr(signal, signum)

    def start(self, context):
        self.mine = context.cfg.eval.episodes == self.episodes

    def after_step(self, state, result, items, seconds):
        if self.mine and state.step == self.step and not self.marker.exists():
            self.marker.touch()
            os.kill(os.getpid(), self.signum)


def sweep(tiny_overrides, tmp_path, *extra, runs="10,11,12"):
    overrides = overrides_for("protonet", [o for o in tiny_overrides if not o.startswith(("train.", "eval."))])
    return [
        "train",
        "-m",
        f"eval.episodes={runs}",  # runs that train alike
        "train.steps=4",
        "train.val_every=2",
        "train.val_episodes=4",
        "train.ckpt_every=1",
        "train.meta_batch_size=2",
        *overrides,
        f"+hooks.stop={{_target_:{__name__}.StopOnce,step:2,episodes:11,marker:{tmp_path / 'stopped'}}}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "hydra.sweep.subdir=${eval.episodes}",
        *extra,
    ]


def test_a_sweep_run_again_skips_what_completed_resumes_what_stopped_and_starts_what_is_missing(
    cli, tiny_overrides, tmp_path
):
    first = cli(*sweep(tiny_overrides, tmp_path), cwd=tmp_path, check=False)
    runs = tmp_path / "sweep"
    assert first.returncode == 128 + signal.SIGTERM  # killed in its second run
    assert torch.load(runs / "10" / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    # the signal came during step 2: step 3 ran, then it stopped
    assert torch.load(runs / "11" / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    assert not (runs / "12").exists()
    done_before = (runs / "10" / "checkpoints" / "last.pt").read_bytes()

    cli(*sweep(tiny_overrides, tmp_path), cwd=tmp_path)
    assert (runs / "10" / "checkpoints" / "last.pt").read_bytes() == done_before  # skipped: nothing trained
    assert "nothing to train" in (runs / "10" / "train.log").read_text()
    assert "resuming" in (runs / "11" / "train.log").read_text()
    assert "from step 3" in (runs / "11" / "train.log").read_text()
    finals = {
        name: torch.load(runs / name / "checkpoints" / "last.pt", weights_only=True) for name in ("10", "11", "12")
    }
    assert all(ckpt["step"] == 4 for ckpt in finals.values())
    # the runs train alike (only eval.episodes differs): the resumed one ends exactly as the others
    assert_same_state(finals["11"]["algo"], finals["10"]["algo"])
    assert_same_state(finals["12"]["algo"], finals["10"]["algo"])


def test_a_sweep_into_a_folder_of_other_runs_is_refused_and_their_record_kept(cli, tiny_overrides, tmp_path):
    (tmp_path / "stopped").touch()  # no stop
    cli(*sweep(tiny_overrides, tmp_path, runs="10"), cwd=tmp_path)
    record = (tmp_path / "sweep" / "10" / ".hydra" / "overrides.yaml").read_text()
    result = cli(*sweep(tiny_overrides, tmp_path, "seed=5", runs="10"), cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "already holds another run (seed: 0 there, 5 here)" in result.stderr
    assert (tmp_path / "sweep" / "10" / ".hydra" / "overrides.yaml").read_text() == record
    assert torch.load(tmp_path / "sweep" / "10" / "checkpoints" / "last.pt", weights_only=True)["step"] == 4


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="the sweep extra: pip install '.[sweep]'",
)
def test_a_job_stopped_by_its_time_limit_requeues_itself_and_resumes_exactly(
    cli, tiny_overrides, tmp_path, monkeypatch
):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    # the run of eval.episodes=11 gets submitit's time-limit signal (SIGUSR2) after step 2, as SLURM sends it
    command = sweep(tiny_overrides, tmp_path, "hydra/launcher=submitit_local", runs="10,11")
    command = [c.replace("signum:SIGTERM", "") for c in command]
    command = [c.replace("marker:", "signum:SIGUSR2,marker:") if c.startswith("+hooks.stop") else c for c in command]
    cli(*command, cwd=tmp_path)
    runs = tmp_path / "sweep"
    log = (runs / "11" / "train.log").read_text()
    assert "SIGUSR2 received (the job's time limit or preemption)" in log
    assert "requeueing the job: it goes on from step 3" in log and "resuming" in log
    finals = {name: torch.load(runs / name / "checkpoints" / "last.pt", weights_only=True) for name in ("10", "11")}
    assert finals["11"]["step"] == 4
    assert_same_state(finals["11"]["algo"], finals["10"]["algo"])


def test_a_killed_study_run_again_takes_up_its_stopped_trial_and_completes(cli, tiny_overrides, tmp_path):
    optuna = pytest.importorskip("optuna", reason="the sweep extra: pip install '.[sweep]'")
    command = [c for c in sweep(tiny_overrides, tmp_path) if not c.startswith(("eval.episodes", "hydra.sweep.subdir"))]
    study = [
        "hparams_search=protonet",
        "task.train.ways=5",
        "algo.lr_decay=0.5",
        "algo.outer_lr=0.001",
        "eval.episodes=choice(10,11)",
        "hydra/sweeper/sampler=grid",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.study_name=tiny",
    ]
    first = cli(*command, *study, cwd=tmp_path, check=False)
    assert first.returncode == 128 + signal.SIGTERM
    storage = f"sqlite:///{tmp_path / 'sweep' / 'study.db'}"
    stopped = next(
        t for t in optuna.load_study(study_name="tiny", storage=storage).trials if t.params["eval.episodes"] == 11
    )
    assert stopped.state == optuna.trial.TrialState.RUNNING  # its process is gone: nothing ended it
    run = tmp_path / "sweep" / f"trial{stopped.number}"
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 3

    again = cli(*command, *study, cwd=tmp_path)
    assert f"trial {stopped.number} of study tiny was left running by a process that stopped: it goes on in {run}" in (
        again.stdout + again.stderr
    )
    trials = optuna.load_study(study_name="tiny", storage=storage).trials
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 2  # none failed, none added
    assert "from step 3" in (run / "train.log").read_text()
    assert trials[stopped.number].value == max(trials[stopped.number].intermediate_values.values())
    assert sorted(trials[stopped.number].intermediate_values) == [2, 4]
