"""Sweeps through Hydra's launcher plugins: joblib runs jobs side by side, each with its share of the cores."""

import pytest
import torch
from helpers.runs import overrides_for

from metalearn.device import cores

pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="the sweep extra: pip install '.[sweep]'")


def test_joblib_runs_a_sweep_in_parallel_with_the_cores_shared(cli, tiny_overrides, tmp_path):
    overrides = overrides_for("protonet", [o for o in tiny_overrides if not o.startswith("train.steps")])
    cli(
        "train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        "train.steps=2",
        *overrides,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",  # joblib's workers outlive a test, and its working directory
        cwd=tmp_path,
    )
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0-protonet-seed0", "1-protonet-seed1"]
    for run in runs:
        assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 2
        assert (
            f"2 runs in parallel (hydra.launcher.n_jobs): {max(1, cores() // 2)} thread(s) each"
            in (run / "train.log").read_text()
        )


def test_a_failed_run_does_not_stop_the_others_and_the_sweep_ends_saying_which(cli, tiny_overrides, tmp_path):
    overrides = overrides_for("protonet", [o for o in tiny_overrides if not o.startswith("train.steps")])
    result = cli(
        "train",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "algo.outer_lr=1e30,0.001",  # the first diverges at its second step
        "train.steps=4",
        *overrides,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
        check=False,
    )
    failed, done = tmp_path / "sweep" / "0-protonet-seed0", tmp_path / "sweep" / "1-protonet-seed0"
    assert torch.load(done / "checkpoints" / "last.pt", weights_only=True)["step"] == 4
    assert "[ERROR] - training diverged at step 2" in (failed / "train.log").read_text()
    assert result.returncode == 1
    assert f"metalearn: error: run {failed} failed: training diverged at step 2" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "choice, module",
    [
        ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher"),
        ("hparams_search=maml", "optuna"),
        ("hydra/sweeper=optuna", "optuna"),
    ],
)
def test_a_missing_plugin_names_the_extra(cli, tmp_path, monkeypatch, choice, module):
    import importlib

    real_import = importlib.import_module

    def without_plugin(name, *args, **kwargs):
        if name.startswith(module):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_plugin)
    result = cli("train", "-m", choice, "seed=0,1", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f'metalearn: error: {choice} needs the sweep extra: pip install ".[sweep]".'


# submitit's local executor runs a sweep as jobs in tests/test_sweep_resume.py (a job that requeues itself) and
# tests/test_study_pruning.py (trials of two processes each).


def test_the_slurm_preset_composes_with_its_keys(cli, tmp_path):
    out = cli("train", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path).stdout
    assert "submitit_launcher.SlurmLauncher" in out and "partition: gpu" in out and "gpus_per_node: 1" in out
    assert "timeout_min: 1440" in out and "signal_delay_s: 120" in out
