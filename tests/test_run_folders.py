"""Run folders: named by interpolations, never rewritten by a refused run, one writer at a time, and a
refused run leaves no folder behind."""

import shlex
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers.runs import overrides_for


def tiny(tiny_overrides, steps: int = 2) -> list:
    keep = [o for o in tiny_overrides if not o.startswith(("train.steps", "train.ckpt_every"))]
    return [*overrides_for("protonet", keep), f"train.steps={steps}", "train.ckpt_every=1"]


def printed_folder(stdout: str) -> Path:
    (line,) = [line for line in stdout.splitlines() if line.startswith("run folder: ")]
    return Path(shlex.split(line[len("run folder: ") :])[0])


def snapshot(folder: Path) -> dict:
    """Every file of a folder, by its path in it, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(result, match: str) -> None:
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    assert f"metalearn: error: {match}" in result.stderr, result.stderr


NO_DATA_KEYS = "hydra.job.config.override_dirname.exclude_keys=[data.root,data.split,data.cache_dir]"


@pytest.mark.parametrize(
    "name",
    ["${algo.name}-${seed}", "${now:%H-%M-%S}-${hydra.job.override_dirname}", "${hydra:job.name}-${seed}"],
    ids=["keys", "time", "resolver"],
)
def test_a_run_folder_named_by_interpolations_is_evaluated_and_resumed(cli, tiny_overrides, tmp_path, name):
    # an override may interpolate too: the run's record keeps it as given
    interpolated = [*tiny(tiny_overrides), "task.train.ways=${task.ways}", NO_DATA_KEYS]
    out = cli("train", *interpolated, f"hydra.run.dir={tmp_path / 'runs' / name}", cwd=tmp_path)
    run = printed_folder(out.stdout)
    assert [p.name for p in (tmp_path / "runs").iterdir()] == [run.name]  # no folder named "${...}"
    if name.startswith("${algo.name}"):
        assert run.name == "protonet-0"
    if name.startswith("${hydra:"):
        assert run.name == "train-0"
    cli("eval", f"run={run}", cwd=tmp_path)
    cli("train", f"resume={run}", "train.steps=3", cwd=tmp_path)
    assert "from_step: 2" in (run / ".hydra" / "resumes.yaml").read_text()


def test_a_refused_run_leaves_the_existing_run_as_it_was(cli, tiny_overrides, tmp_path):
    cli("train", *tiny(tiny_overrides), f"hydra.run.dir={tmp_path / '0'}", cwd=tmp_path)
    before = snapshot(tmp_path / "0")
    again = cli("train", *tiny(tiny_overrides, 3), f"hydra.run.dir={tmp_path}/${{seed}}", cwd=tmp_path, check=False)
    refused(again, f"{tmp_path / '0'} already holds a run")
    assert snapshot(tmp_path / "0") == before


@pytest.mark.parametrize("fault", ["bad override", "refused in training", "bad override, interpolated name"])
def test_a_refused_run_leaves_no_folder_it_made(cli, tiny_overrides, tmp_path, fault):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "kept.txt").write_text("was there before")
    folder, extra, match = f"{tmp_path}/a/b/c/d", "train.nope=1", "Could not override 'train.nope'"
    if fault == "refused in training":
        extra, match = "task.ways=50", "task.ways=50"
    elif fault == "bad override, interpolated name":
        folder = f"{tmp_path}/a/b/${{algo.name}}/${{seed}}"
    refused(cli("train", *tiny(tiny_overrides), extra, f"hydra.run.dir={folder}", check=False), match)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["kept.txt"]


def test_an_over_long_folder_name_is_one_error_that_says_what_to_shorten(cli, tiny_overrides, tmp_path):
    more = [f"train.{key}={value}" for key, value in (("val_seed", 0), ("keep_best", 1), ("replay.size", 1000))]
    result = cli(
        "train",
        *tiny(tiny_overrides),
        *more,
        NO_DATA_KEYS,
        f"hydra.run.dir={tmp_path}/sweep/${{hydra.job.override_dirname}}",
        cwd=tmp_path,
        check=False,
    )
    refused(result, "the run folder name algo=protonet,device=cpu")
    assert "more than the 255" in result.stderr and "hydra.job.config.override_dirname.exclude_keys" in result.stderr
    assert list(tmp_path.iterdir()) == []


# A process that holds a run folder's lock (the test's other writer) until its stdin closes, or kills itself.
HOLDER = """
import os, signal, sys
from metalearn.storage.run_lock import lock_run
lock_run(sys.argv[1], "metalearn train (the other writer)")
print("locked", flush=True)
if sys.argv[2] == "die":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
"""


@contextmanager
def other_writer(folder: Path):
    """A second process holding the folder's lock for the block: yields its pid."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder), "hold"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        yield holder.pid
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)


def killed_writer(folder: Path) -> None:
    """A process that locked the folder, then was killed: its .lock file stays behind."""
    died = subprocess.run([sys.executable, "-c", HOLDER, str(folder), "die"], capture_output=True)
    assert died.returncode == -signal.SIGKILL and (folder / ".lock").is_file()


@pytest.mark.parametrize("request_", ["resume", "new run"])
def test_a_run_folder_has_one_writer(cli, tiny_overrides, tmp_path, request_):
    run = tmp_path / "run"
    if request_ == "resume":
        cli("train", *tiny(tiny_overrides), f"hydra.run.dir={run}", cwd=tmp_path)
        command = ["train", f"resume={run}", "train.steps=3"]
    else:
        run.mkdir()
        command = ["train", *tiny(tiny_overrides), f"hydra.run.dir={run}"]
    with other_writer(run) as pid:
        before = snapshot(run)
        second = cli(*command, cwd=tmp_path, check=False)
        refused(second, f"{run} is in use by process {pid} on {socket.gethostname()}, started ")
        assert "metalearn train (the other writer)" in second.stderr
        assert snapshot(run) == before

    killed_writer(run)  # a lock left by a killed process stops no one
    cli(*command, cwd=tmp_path)
    assert not (run / ".lock").exists()  # given back, and removed, when the run ended


def test_a_sweep_run_has_one_writer(cli, tiny_overrides, tmp_path):
    sweep = [*tiny(tiny_overrides), f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=${seed}"]
    (tmp_path / "0").mkdir()
    with other_writer(tmp_path / "0") as pid:
        result = cli("train", "-m", "seed=0,1", *sweep, cwd=tmp_path, check=False)
    assert result.returncode == 1 and f"is in use by process {pid}" in result.stderr, result.stderr
    assert not (tmp_path / "0" / "checkpoints").exists() and (tmp_path / "1" / "checkpoints" / "last.pt").is_file()


def test_an_ensemble_of_folders_that_are_not_runs_is_refused_and_writes_nothing(cli, tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    result = cli("eval", f"run=[{tmp_path / 'a'},{tmp_path / 'b'}]", cwd=tmp_path, check=False)
    refused(result, f"{tmp_path / 'a'} is not a metalearn run folder")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b"]  # no log, no record
