"""Fault injection on tiny runs: kills, failed writes, divergence, damaged caches, refused resumes.

Each fault must lose nothing that was saved and end in a one-paragraph
`metalearn: error: ...`, never a traceback.
"""

import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import metalearn_cli
from helpers.data import tiny_data_config
from helpers.runs import assert_same_state, overrides_for

from metalearn.data import load_split
from metalearn.storage.checkpoint import load_checkpoint, non_finite

# A child process that runs `metalearn <argv>` and SIGKILLs itself at the Nth atomic file replacement:
# the new checkpoint is fully written to its temporary file, the old one is still in place.
KILL_AT_REPLACE = """
import os, signal, sys
replace, calls = os.replace, [0]
def dying_replace(src, dst):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_REPLACE"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst)
os.replace = dying_replace
from metalearn.cli import main
main(sys.argv[1:])
"""


def child(*args, cwd, env=None, preexec=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", KILL_AT_REPLACE, *map(str, args)],
        cwd=cwd,
        env={**os.environ, "KILL_AT_REPLACE": "0", **(env or {})},
        preexec_fn=preexec,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def records(run: Path) -> list:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in ("time", "tasks_per_s")} for line in lines]


def tiny(tiny_overrides, steps: int) -> list:
    keep = [o for o in tiny_overrides if not o.startswith(("train.steps", "train.ckpt_every"))]
    return [*overrides_for("protonet", keep), f"train.steps={steps}", "train.ckpt_every=1"]


def test_killed_anywhere_even_while_writing_a_checkpoint_the_run_resumes_identically(tiny_overrides, tmp_path):
    steps = 6
    straight, run = tmp_path / "straight", tmp_path / "run"
    began = time.monotonic()
    metalearn_cli("train", *tiny(tiny_overrides, steps), f"hydra.run.dir={straight}", cwd=tmp_path)
    whole_run = time.monotonic() - began  # start-up included: the kills below scale with this machine's speed

    # killed during the 3rd checkpoint write: last.pt of the step before stays, with an orphaned temporary file
    killed = child(
        "train", *tiny(tiny_overrides, steps), f"hydra.run.dir={run}", cwd=tmp_path, env={"KILL_AT_REPLACE": "3"}
    )
    assert killed.returncode == -signal.SIGKILL
    assert list((run / "checkpoints").glob(".*.tmp")), "the kill left the half-done write behind"
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] >= 1

    # then killed at random moments while resuming (the last try is let finish), until the run is done
    rng = random.Random(0)
    for attempt in range(10):
        if load_checkpoint(run / "checkpoints" / "last.pt")["step"] == steps:
            break
        process = subprocess.Popen(
            [sys.executable, "-c", KILL_AT_REPLACE, "train", f"resume={run}"],
            cwd=tmp_path,
            env={**os.environ, "KILL_AT_REPLACE": "0"},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            process.wait(timeout=None if attempt == 9 else rng.uniform(0.4, 1.2) * whole_run)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
    assert not list((run / "checkpoints").glob(".*.tmp")), "a resume cleans up what a kill left"
    a, b = load_checkpoint(straight / "checkpoints" / "last.pt"), load_checkpoint(run / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == steps
    assert_same_state(a["algo"], b["algo"])
    assert records(straight) == records(run)


def test_a_failed_write_says_so_and_keeps_the_previous_checkpoint(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    metalearn_cli("train", *tiny(tiny_overrides, 2), f"hydra.run.dir={run}", cwd=tmp_path)
    before = (run / "checkpoints" / "last.pt").read_bytes()

    limit = len(before) // 2  # a full disk, as the process sees it: no file may grow past half a checkpoint

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    result = child("train", f"resume={run}", "train.steps=4", cwd=tmp_path, preexec=small_files)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("metalearn: error:")]
    assert error.startswith("metalearn: error: could not write") and "File too large" in error, error
    assert "is intact" in error and f"metalearn train resume={run}" in error
    assert (run / "checkpoints" / "last.pt").read_bytes() == before
    assert not list((run / "checkpoints").glob(".*.tmp"))
    metalearn_cli("train", f"resume={run}", "train.steps=3", cwd=tmp_path)  # with room again, it goes on
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3


def test_a_diverging_run_stops_and_writes_nothing_non_finite(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = [*tiny(tiny_overrides, 8), "algo.outer_lr=1e30", "train.val_every=1", f"hydra.run.dir={run}"]
    result = cli("train", *overrides, cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "metalearn: error: training diverged at step" in result.stderr and "algo.outer_lr" in result.stderr
    for path in (run / "checkpoints").glob("*.pt"):
        assert non_finite(load_checkpoint(path)["algo"]) == [], path
    for line in (run / "metrics.jsonl").read_text().splitlines():  # strict JSON: no NaN or Infinity
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_infinite_and_nan_rates_are_refused(cli, tiny_overrides, tmp_path):
    for value in ("inf", "nan"):
        result = cli("train", *tiny(tiny_overrides, 1), f"algo.outer_lr={value}", cwd=tmp_path, check=False)
        assert result.returncode == 1 and "algo.outer_lr must be a finite number above 0" in result.stderr


def test_a_damaged_cache_is_rebuilt_not_trusted(tiny_data, tmp_path, caplog):
    data = tiny_data_config(tiny_data)
    data.cache_dir = str(tmp_path / "cache")
    clean = load_split(data, "train").images
    (cache,) = (tmp_path / "cache").glob("omniglot-*.pt")
    damaged = bytearray(cache.read_bytes())
    middle = len(damaged) // 2
    damaged[middle : middle + 64] = bytes(255 - b for b in damaged[middle : middle + 64])  # same size, other pixels
    cache.write_bytes(bytes(damaged))
    assert torch.equal(load_split(data, "train").images, clean)
    assert "does not match its checksum" in caplog.text and "rebuilding" in caplog.text
    assert load_split(data, "train").images.equal(clean)  # the rebuilt cache is trusted again


def test_a_refused_resume_leaves_the_run_as_it_was(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    cli("train", *tiny(tiny_overrides, 2), f"hydra.run.dir={run}", cwd=tmp_path)
    record = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    refused = cli("train", f"resume={run}", "model.hidden=4", cwd=tmp_path, check=False)
    assert refused.returncode == 1 and "does not fit this configuration" in refused.stderr
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == record
    cli("eval", f"run={run}", cwd=tmp_path)
    cli("train", f"resume={run}", "train.steps=3", cwd=tmp_path)
    history = (run / ".hydra" / "resumes.yaml").read_text()
    assert "from_step: 2" in history and "- train.steps=3" in history
    assert "- train.steps=3" in (run / ".hydra" / "overrides.yaml").read_text()
    cli("train", f"resume={run}", "train.steps=4", cwd=tmp_path)
    assert (run / ".hydra" / "resumes.yaml").read_text().count("from_step:") == 2  # appended, not overwritten


def test_out_of_range_seeds_are_refused(cli, tiny_overrides, tmp_path):
    for key in ("seed", "train.val_seed", "eval.seed"):
        for value in (-1, 2**63):
            result = cli("train", *tiny(tiny_overrides, 1), f"{key}={value}", cwd=tmp_path, check=False)
            assert result.returncode == 1 and f"{key} must be in [0, 2**63)" in result.stderr, result.stderr
        result = cli("train", *tiny(tiny_overrides, 1), f"{key}=???", cwd=tmp_path, check=False)  # found by hypothesis
        assert result.returncode == 1 and f"{key} has no value (???)" in result.stderr, result.stderr


def test_the_printed_commands_can_be_pasted_for_a_folder_with_a_space(cli, tiny_overrides, tmp_path):
    run = tmp_path / "my runs" / "one"
    out = cli("train", *tiny(tiny_overrides, 1), f"hydra.run.dir='{run}'", cwd=tmp_path).stdout
    assert f"run folder: '{run}'" in out


def test_a_run_folder_that_cannot_take_results_is_still_evaluated(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    cli("train", *tiny(tiny_overrides, 1), f"hydra.run.dir={run}", cwd=tmp_path)
    (run / "evals.jsonl").mkdir()  # neither file can be written there, for any user
    (run / "eval.log").mkdir()
    result = cli("eval", f"run={run}", cwd=tmp_path)
    assert "test accuracy" in result.stdout
    assert "could not be saved in" in result.stderr and "cannot write" in result.stderr


def test_a_model_too_large_for_memory_is_an_error_not_a_traceback(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    result = cli("train", *tiny(tiny_overrides, 1), "model.hidden=1000000", f"hydra.run.dir={run}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "metalearn: error: out of memory" in result.stderr and "model.hidden" in result.stderr
    assert "algo.first_order=true" in result.stderr
    assert not run.exists()  # nothing was started, so no run folder is left behind


@pytest.mark.parametrize("algo", ["maml", "protonet"])  # a plain Adam rate; one under a step-decay schedule
def test_a_learning_rate_given_on_resume_is_the_one_used(cli, tiny_overrides, tmp_path, algo):
    run = tmp_path / "run"
    overrides = [*overrides_for(algo, tiny_overrides), "train.steps=2", f"hydra.run.dir={run}"]
    if algo == "protonet":
        overrides.append("algo.lr_decay_every=1")  # halved after every step
    cli("train", *overrides, cwd=tmp_path)
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["algo"]["optimizer"]["param_groups"][0]["lr"]
    cli("train", f"resume={run}", "train.steps=3", "algo.outer_lr=0.5", cwd=tmp_path)
    resumed = load_checkpoint(run / "checkpoints" / "last.pt")["algo"]["optimizer"]["param_groups"][0]["lr"]
    # maml: 0.5 from now on; protonet: 0.5 x the decay reached (0.5 per step: saved = 1e-3 x 0.25, then 3 steps)
    expected = 0.5 if algo == "maml" else 0.5 * 0.5**3
    assert saved != expected and resumed == pytest.approx(expected)


def test_a_run_folder_that_cannot_be_written_is_not_resumed_and_not_touched(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    cli("train", *tiny(tiny_overrides, 1), f"hydra.run.dir={run}", cwd=tmp_path)
    (run / "train.log").unlink()
    (run / "train.log").mkdir()  # the log cannot be opened, for any user
    before = load_checkpoint(run / "checkpoints" / "last.pt")
    result = cli("train", f"resume={run}", "train.steps=2", cwd=tmp_path, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "metalearn: error: cannot write" in result.stderr and "Nothing was changed" in result.stderr
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == before["step"]


def test_a_run_folder_that_cannot_be_made_is_an_error_not_a_traceback(cli, tiny_overrides, tmp_path):
    (tmp_path / "a-file").write_text("")  # a folder cannot be made inside a file, for any user
    result = cli("train", *tiny(tiny_overrides, 1), f"hydra.run.dir={tmp_path / 'a-file' / 'run'}", check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "metalearn: error: cannot write in" in result.stderr and "hydra.run.dir=" in result.stderr
