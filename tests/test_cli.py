"""End-to-end CLI runs on the tiny generated Omniglot: folders, metrics, eval, resume."""

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers.cli import metalearn_cli


def metrics(run: Path, keys=("step", "split", "loss", "accuracy")):
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: json.loads(line)[k] for k in keys} for line in lines]


def test_help_lists_the_commands(cli):
    out = cli("--help").stdout
    assert "train" in out and "eval" in out
    algos = sorted(p.stem for p in (Path(__file__).parents[1] / "conf" / "algo").glob("*.yaml"))
    assert "distill" in algos and "maml" in algos
    assert f"algo: {', '.join(algos)}" in cli("train", "--help").stdout
    composed = cli("train", "--cfg", "job", "algo=fomaml", "task.ways=20").stdout
    assert "first_order: true" in composed and "ways: 20" in composed


@pytest.mark.parametrize("args", [["--help"], ["train", "--help"], ["train", "--cfg", "job", "algo=reptile"]])
def test_help_and_the_composed_config_answer_without_loading_torch(args, tmp_path):
    """torch takes seconds to import: commands that only read the config must not need it."""
    probe = (
        "import sys\n"
        "from metalearn.cli import main\n"
        "try:\n"
        f"    main({args!r})\n"
        "except SystemExit as end:\n"
        "    assert not end.code, end.code\n"
        "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded', file=sys.stderr)\n"
    )
    # not from the repository's folder, whose metalearn/ (without conf/) would shadow the installed package
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert result.stderr.strip().splitlines()[-1] == "torch not loaded"
    assert result.stdout.strip()  # it answered


def test_unknown_command_is_an_error(cli):
    result = cli("trian", check=False)
    assert result.returncode == 2 and "unknown command 'trian'" in result.stderr


def test_train_writes_a_run_folder_then_eval_appends(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    result = cli("train", *tiny_overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    assert result.stdout.strip().splitlines()[-1] == f"run folder: {run}"
    assert (run / ".hydra" / "config.yaml").is_file() and (run / "train.log").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["split"] == "val"] == [2, 4]
    assert all({"loss", "accuracy"} <= r.keys() and 0 <= r["accuracy"] <= 1 for r in records)
    for name in ("last", "best"):
        ckpt = torch.load(run / "checkpoints" / f"{name}.pt", weights_only=True)
        assert ckpt["config"]["task"]["ways"] == 5 and "model" in ckpt["algo"]
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == 4

    first = cli("eval", f"run={run}", cwd=tmp_path).stdout
    assert re.search(r"test accuracy \d+\.\d\d% ± \d+\.\d\d \(10 episodes, omniglot 5-way 1-shot, best\.pt\)", first)
    cli("eval", f"run={run}", "checkpoint=last", "eval.episodes=6", "task.shots=2", cwd=tmp_path)
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert len(evals) == 2  # appended, never overwritten
    assert evals[0]["checkpoint"] == "best.pt" and evals[0]["episodes"] == 10 and evals[0]["shots"] == 1
    assert evals[1]["checkpoint"] == "last.pt" and evals[1]["episodes"] == 6 and evals[1]["shots"] == 2
    for e in evals:
        assert {"accuracy", "ci95", "ways", "dataset"} <= e.keys() and e["dataset"] == "omniglot"
        assert 0 <= e["accuracy"] <= 1 and e["ci95"] >= 0
    # the run's own record is untouched by eval (whose config has a `run` key and a `checkpoint`)
    record = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert "run" not in record and "checkpoint" not in record and record["task"]["shots"] == 1


def test_eval_uses_a_fixed_seed(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    cli("train", *tiny_overrides, "train.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    cli("eval", f"run={run}", cwd=tmp_path)
    cli("eval", f"run={run}", cwd=tmp_path)
    cli("eval", f"run={run}", "eval.seed=5", cwd=tmp_path)
    a, b, c = [json.loads(line)["accuracy"] for line in (run / "evals.jsonl").read_text().splitlines()]
    assert a == b and a != c


@pytest.mark.parametrize(
    "replay", [[], ["train.replay.fraction=0.5", "train.replay.size=3"]], ids=["plain", "task_replay"]
)
def test_resumed_run_equals_a_straight_run(cli, tiny_overrides, tmp_path, replay):
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = [*tiny_overrides, *replay, "train.steps=6", "train.val_every=3", "train.ckpt_every=1"]
    cli("train", *common, f"hydra.run.dir={straight}", cwd=tmp_path)
    cli("train", *common, "train.steps=3", f"hydra.run.dir={split}", cwd=tmp_path)
    # the resumed run keeps the original overrides (tiny data, cpu) and takes the new train.steps
    cli("train", f"resume={split}", "train.steps=6", cwd=tmp_path)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for name, tensor in a["algo"]["model"].items():
        assert torch.equal(tensor, b["algo"]["model"][name]), name
    assert metrics(straight) == metrics(split)


def test_sigint_saves_last_and_the_run_resumes(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    exe = Path(sys.executable).parent / "metalearn"
    overrides = [o for o in tiny_overrides if not o.startswith("train.")]
    process = subprocess.Popen(
        [
            str(exe),
            "train",
            *overrides,
            "train.steps=100000",
            "train.val_every=100000",
            "train.ckpt_every=100000",
            "train.log_every=1",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600
    while not ((run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3):
        if time.time() > deadline or process.poll() is not None:
            process.kill()
            pytest.fail(f"the run made no progress to interrupt:\n{process.communicate()[1]}")
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and f"resume with: metalearn train resume={run}" in stdout
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] >= 3
    metalearn_cli("train", f"resume={run}", f"train.steps={saved['step'] + 2}", "train.val_every=1000", cwd=tmp_path)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == saved["step"] + 2
    assert [r["step"] for r in metrics(run) if r["split"] == "train"] == list(range(1, saved["step"] + 3))


def test_multirun_gives_one_folder_per_job(cli, tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("train.steps")]
    cli("train", "-m", "algo=maml,fomaml", "train.steps=2", *overrides, "hydra.sweep.dir=sweep", cwd=tmp_path)
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert folders == ["0-maml-seed0", "1-fomaml-seed0"]
    for folder in folders:
        assert (tmp_path / "sweep" / folder / "checkpoints" / "last.pt").is_file()
    config = (tmp_path / "sweep" / "1-fomaml-seed0" / ".hydra" / "config.yaml").read_text()
    assert "first_order: true" in config


def test_default_run_folder_names_algo_and_task(cli, tiny_overrides, tmp_path):
    cli("train", *tiny_overrides, "train.steps=1", "algo=fomaml", "task.ways=3", cwd=tmp_path)
    (folder,) = (tmp_path / "runs" / "fomaml" / "omniglot-3w1s").iterdir()
    assert (folder / "checkpoints" / "best.pt").is_file()
