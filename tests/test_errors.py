"""Bad input ends with one clear paragraph and a non-zero exit, never a traceback."""

import shutil

import pytest
import torch

from helpers.cli import metalearn_in_process as metalearn_cli


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    """One finished tiny run that the eval error tests can damage copies of."""
    base = tmp_path_factory.mktemp("errors")
    run = base / "run"
    metalearn_cli(
        "train",
        f"data.root={tiny_data['root']}",
        f"data.split={tiny_data['split']}",
        f"data.cache_dir={tiny_data['cache']}",
        "task.queries=3",
        "model.hidden=8",
        "train.steps=1",
        "train.meta_batch_size=1",
        "train.val_episodes=2",
        "eval.episodes=10",
        "algo.inner_steps_eval=2",
        "device=cpu",
        f"hydra.run.dir={run}",
        cwd=base,
    )
    return run


def fails(*args, match: str, cwd=None):
    result = metalearn_cli(*args, check=False, cwd=cwd)
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert match in result.stderr, result.stderr
    return result


def test_more_ways_than_classes(tiny_overrides, tmp_path):
    fails("train", *tiny_overrides, "task.ways=13", match="choose task.ways <= 12", cwd=tmp_path)


def test_more_shots_and_queries_than_drawings(tiny_overrides, tmp_path):
    fails(
        "train",
        *tiny_overrides,
        "task.shots=5",
        "task.queries=16",
        match="choose task.shots + task.queries <= 20",
        cwd=tmp_path,
    )


def test_missing_dataset(tmp_path):
    fails(
        "train",
        f"data.root={tmp_path}/nothing",
        f"data.cache_dir={tmp_path}/cache",
        match="images_background.zip",
        cwd=tmp_path,
    )


def test_unknown_key_and_wrong_type(tiny_overrides, tmp_path):
    fails("train", *tiny_overrides, "train.stepz=3", match="Key 'stepz' not in", cwd=tmp_path)
    fails("train", *tiny_overrides, "algo.inner_lr=fast", match="algo.inner_lr: Value 'fast'", cwd=tmp_path)
    fails(
        "train",
        *tiny_overrides,
        "algo.vectorize=sometimes",
        match="algo.vectorize: Invalid value 'sometimes'",
        cwd=tmp_path,
    )
    fails("train", *tiny_overrides, "algo=nosuch", match="Could not find 'algo/nosuch'", cwd=tmp_path)


def test_out_of_range_values(tiny_overrides, tmp_path):
    run = tmp_path / "refused"
    fails("train", *tiny_overrides, "task.shots=0", f"hydra.run.dir={run}", match="task.shots must be at least 1")
    assert not run.exists()  # a run refused before it started leaves no folder behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present, so device=cuda is valid here")
def test_cuda_without_a_gpu(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("device")]
    fails("train", *overrides, "device=cuda", match="torch sees none", cwd=tmp_path)


def test_corrupt_checkpoint(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    best = run / "checkpoints" / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])
    fails("eval", f"run={run}", match="cannot be read as a checkpoint", cwd=tmp_path)
    # the other checkpoint still works
    assert "test accuracy" in metalearn_cli("eval", f"run={run}", "checkpoint=last", cwd=tmp_path).stdout


def test_checkpoint_that_is_not_ours(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    torch.save({"weights": torch.zeros(3)}, run / "checkpoints" / "best.pt")
    fails("eval", f"run={run}", match="is not a metalearn checkpoint", cwd=tmp_path)


def test_checkpoint_with_code_inside_is_refused(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    torch.save({"format": "metalearn-checkpoint", "payload": shutil.copytree}, run / "checkpoints" / "best.pt")
    fails("eval", f"run={run}", match="cannot be read as a checkpoint", cwd=tmp_path)


def test_mismatched_checkpoint(trained_run, tmp_path):
    fails("eval", f"run={trained_run}", "task.ways=3", match="does not fit this configuration", cwd=tmp_path)


def test_eval_needs_a_run_folder(trained_run, tmp_path):
    fails("eval", match="metalearn eval run=<run folder>", cwd=tmp_path)
    fails("eval", f"run={tmp_path}/nowhere", match="does not exist", cwd=tmp_path)
    fails("eval", f"run={tmp_path}", match="is not a metalearn run folder", cwd=tmp_path)


def test_a_finished_run_folder_is_not_overwritten(trained_run, tiny_overrides, tmp_path):
    kept = [
        trained_run / "checkpoints" / "last.pt",
        trained_run / ".hydra" / "overrides.yaml",
        trained_run / ".hydra" / "config.yaml",
    ]
    before = [path.read_bytes() for path in kept]
    fails("train", *tiny_overrides, f"hydra.run.dir={trained_run}", match="resume=", cwd=tmp_path)
    assert [path.read_bytes() for path in kept] == before


def test_resume_without_a_checkpoint(tmp_path, trained_run):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    shutil.rmtree(run / "checkpoints")
    fails("train", f"resume={run}", match="No checkpoint at", cwd=tmp_path)
