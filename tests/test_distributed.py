"""One run on two processes (torch.distributed, gloo) trains, validates, resumes and evaluates as one process.

Float64 runs (device.dtype=float64), so the only difference left is the order
of floating-point sums. Each rank runs on cores / 2 threads; the one-process
reference runs on as many, so a task's own arithmetic is the same in both.
"""

import json
import re
import shutil
import signal
import time

import pytest
import torch
from omegaconf import OmegaConf

from helpers.ranks import run_ranks, start_ranks
from helpers.runs import overrides_for
from metalearn.algorithms import build_algorithm
from metalearn.data import Episodes
from metalearn.distributed import Ranks
from metalearn.errors import MetalearnError
from metalearn.device import cores

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")

# A conv bias a BatchNorm follows: the normalisation removes it, so its gradient is zero up to rounding,
# which Adam divides by the rounding's own size. Those differ by ~1e-8 between any two summation orders;
# the outputs they cannot change are compared instead.
CANCELLED = re.compile(r"features\.\d+\.0\.bias")
FLOAT64 = ["device.dtype=float64", "train.meta_batch_size=4", "train.val_every=2", "train.ckpt_every=1"]


@pytest.fixture
def rank_threads():
    """This process computes on the threads each of two ranks gets."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, cores() // 2))
    yield
    torch.set_num_threads(threads)


def outputs(run, images):
    """The logits of a run's last model on `images` (evaluation mode)."""
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    algo = build_algorithm(
        OmegaConf.create(ckpt["config"]), torch.device("cpu"), ckpt["train_classes"], tuple(images.shape[1:])
    )
    algo.load_state_dict(ckpt["algo"])
    algo.model.eval()
    with torch.no_grad():
        return algo.model(images)


def assert_same_model(one, two, atol=1e-10):
    a = torch.load(one / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(two / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"]
    for name, weight in a["algo"]["model"].items():
        tolerance = 1e-6 if CANCELLED.fullmatch(name) else atol
        assert torch.allclose(weight, b["algo"]["model"][name], rtol=0, atol=tolerance), name
    images = torch.rand(6, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(outputs(one, images), outputs(two, images), rtol=0, atol=atol)


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.2)


def val_records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "val"]


@pytest.mark.parametrize("algo", ["fomaml", "maml", "protonet", "finetune", "reptile"])
def test_two_processes_train_the_model_one_process_trains(cli, tiny_overrides, tmp_path, rank_threads, algo):
    common = [*overrides_for(algo, tiny_overrides), *FLOAT64, "train.steps=3"]
    cli("train", *common, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    run_ranks(2, ["train", *common, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert_same_model(tmp_path / "one", tmp_path / "two")
    one, two = val_records(tmp_path / "one"), val_records(tmp_path / "two")
    assert [r["accuracy"] for r in one] == [r["accuracy"] for r in two]  # every episode, gathered from both ranks
    assert [r["ci95"] for r in one] == pytest.approx([r["ci95"] for r in two], abs=1e-12)
    # rank 0 alone writes: one record, one log
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        ".hydra",
        "checkpoints",
        "metrics.jsonl",
        "train.log",
    ]
    log = (tmp_path / "two" / "train.log").read_text()
    assert "rank 0 of 2" in log and "rank 1 of 2" not in log


def test_a_two_process_checkpoint_resumes_on_one_process_as_on_two(cli, tiny_overrides, tmp_path, rank_threads):
    common = [*overrides_for("fomaml", tiny_overrides), *FLOAT64]
    first = tmp_path / "on-one"
    run_ranks(2, ["train", *common, "train.steps=2", f"hydra.run.dir={first}"], tmp_path)
    second = tmp_path / "on-two"
    shutil.copytree(first, second)
    cli("train", f"resume={first}", "train.steps=4", cwd=tmp_path)
    run_ranks(2, ["train", f"resume={second}", "train.steps=4"], tmp_path)
    assert_same_model(first, second)


def test_evaluation_on_two_processes_scores_the_episodes_one_process_scores(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    cli("train", *overrides_for("fomaml", tiny_overrides), "train.steps=2", f"hydra.run.dir={run}", cwd=tmp_path)
    cli("eval", f"run={run}", "checkpoint=last", "eval.episodes=9", cwd=tmp_path)
    run_ranks(2, ["eval", f"run={run}", "checkpoint=last", "eval.episodes=9"], tmp_path)
    one, two = map(json.loads, (run / "evals.jsonl").read_text().splitlines())
    for key in ("accuracy", "ci95", "episodes", "episode_digest"):
        assert one[key] == pytest.approx(two[key], abs=1e-6) if isinstance(one[key], float) else one[key] == two[key]


def test_a_batch_is_split_in_order_and_one_smaller_than_the_processes_is_refused():
    batch = Episodes(*(torch.arange(5 * k).view(5, k) for k in (1, 2, 3, 4)))
    parts = [Ranks(rank, 2).split(batch) for rank in range(2)]
    assert [p.support.flatten().tolist() for p in parts] == [[0, 1], [2, 3, 4]]
    assert torch.equal(torch.cat([p.query for p in parts]), batch.query)
    with pytest.raises(MetalearnError, match="train.meta_batch_size=1 cannot be split across 2 processes"):
        Ranks(0, 2).split(Episodes(*(t[:1] for t in batch)))


def test_a_killed_rank_ends_the_run_with_an_error_and_it_resumes(cli, tiny_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = [*overrides_for("fomaml", tiny_overrides), "train.steps=100000", "train.ckpt_every=1"]
    processes = start_ranks(2, ["train", *overrides, "device.dist_timeout_s=60", f"hydra.run.dir={run}"], tmp_path)
    wait_for(lambda: (run / "checkpoints" / "last.pt").exists())
    processes[1].send_signal(signal.SIGKILL)
    started = time.monotonic()
    _, err = processes[0].communicate(timeout=120)
    assert processes[0].returncode == 1 and time.monotonic() - started < 60
    assert "rank 0 of 2 lost the other processes" in err and "resume=<run folder>" in err
    step = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    cli("train", f"resume={run}", f"train.steps={step + 1}", cwd=tmp_path)
    assert torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"] == step + 1


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="the sweep extra: pip install '.[sweep]'",
)
def test_a_launcher_job_of_two_tasks_is_one_run_on_two_processes(cli, tiny_overrides, tmp_path, rank_threads):
    """What hydra/launcher=slurm does with tasks_per_node=2, through submitit's local executor."""
    common = [*overrides_for("fomaml", tiny_overrides), *FLOAT64, "train.steps=3"]
    cli("train", *common, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    cli(
        "train",
        "-m",
        "hydra/launcher=submitit_local",
        "hydra.launcher.tasks_per_node=2",
        *common,
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        cwd=tmp_path,
    )
    two = tmp_path / "sweep" / "0-fomaml-seed0"
    assert_same_model(tmp_path / "one", two)
    log = (two / "train.log").read_text()
    assert "rank 0 of 2" in log and "rank 1 of 2" not in log


def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    overrides = [*overrides_for("fomaml", tiny_overrides), "train.steps=100000", "train.ckpt_every=100000"]
    processes = start_ranks(2, ["train", *overrides, f"hydra.run.dir={run}"], tmp_path)
    wait_for(lambda: (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text())
    processes[1].send_signal(signal.SIGTERM)
    outputs = [p.communicate(timeout=120) for p in processes]
    assert [p.returncode for p in processes] == [128 + signal.SIGTERM] * 2, outputs
    saved = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["step"]
    logged = max(json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines())
    assert saved == logged  # rank 0 saved the step both ranks stopped after
    assert f"resume with: metalearn train resume={run}" in outputs[0][0]
