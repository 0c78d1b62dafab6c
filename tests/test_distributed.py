"""One run on two processes (torch.distributed, gloo) trains, validates, resumes and evaluates as one process.

Float64 runs (device.dtype=float64), so the only difference left is the order
of floating-point sums. Each rank runs on cores / 2 threads; the one-process
reference runs on as many, so a task's own arithmetic is the same in both.
"""

import json
import os
import re
import shutil
import signal
import time

import pytest
import torch
from helpers.cli import metalearn_cli
from helpers.ranks import free_port, run_ranks, start_ranks
from helpers.runs import overrides_for
from omegaconf import OmegaConf

from metalearn.algorithms import build_algorithm
from metalearn.data import Episodes
from metalearn.device import cores
from metalearn.distributed import Ranks, from_environment
from metalearn.errors import MetalearnError

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
    # what an algorithm learns besides the network: R2-D2's head, finetune's training-class mean
    for name, value in {**a["algo"].get("head", {}), "base_mean": a["algo"].get("base_mean")}.items():
        other = b["algo"].get("head", {}).get(name, b["algo"].get(name))
        assert value is None or torch.allclose(value, other, rtol=0, atol=1e-6), name
    images = torch.rand(6, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(outputs(one, images), outputs(two, images), rtol=0, atol=atol)


def wait_for(condition, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.2)


def val_records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "val"]


@pytest.mark.parametrize("algo", ["fomaml", "maml", "protonet", "r2d2", "finetune", "reptile"])
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


def train_records(run):
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["split"] == "train"]


# Batches of 3 tasks (7 images for finetune) on 2 ranks: slices of 1 and 2 (3 and 4), so each rank's mean
# counts for its share of the batch, not for half of it. Finetune's BatchNorm sums its statistics over the ranks.
UNEVEN = {
    "fomaml": ["train.meta_batch_size=3"],
    "reptile": ["train.meta_batch_size=3"],
    "finetune": ["train.meta_batch_size=3", "algo.batch_size=7"],
}


@pytest.mark.parametrize("algo", sorted(UNEVEN))
def test_an_uneven_split_trains_and_logs_what_one_process_does(cli, tiny_overrides, tmp_path, rank_threads, algo):
    tiny = [o for o in overrides_for(algo, tiny_overrides) if not o.startswith(("train.meta_batch_size", "algo.batch"))]
    common = [*tiny, *UNEVEN[algo], "device.dtype=float64", "train.steps=3", "train.val_every=3", "train.log_every=1"]
    cli("train", *common, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    run_ranks(2, ["train", *common, f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    assert "rank 0 of 2" in (tmp_path / "two" / "train.log").read_text()
    assert_same_model(tmp_path / "one", tmp_path / "two")
    one, two = train_records(tmp_path / "one"), train_records(tmp_path / "two")
    assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3]
    # the whole batch's means: each rank's weighted by its share (an accuracy is a float32 mean of 0s and 1s)
    for key, tolerance in (("loss", 1e-9), ("accuracy", 1e-6)):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=0, abs=tolerance), key


TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SLURM_JOB = {  # a job of two tasks on one node, this process its second (what submitit's slurm executor sees)
    "SUBMITIT_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "7",
    "SLURM_NTASKS": "2",
    "SLURM_JOB_NUM_NODES": "1",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "1",
    "SLURM_JOB_NODELIST": "127.0.0.1",
}


@pytest.fixture
def rendezvous_env(monkeypatch):
    """Sets the given variables for one test; whatever it (or submitit's export) adds to torchrun's is undone."""
    for name in TORCHRUN_VARIABLES + tuple(SLURM_JOB):
        monkeypatch.setenv(name, "")  # recorded, so the end of the test restores it (to unset)
        monkeypatch.delenv(name)

    def set_env(**variables):
        for name, value in variables.items():
            monkeypatch.setenv(name, str(value))

    return set_env


def assert_one_error_line(result, expected: str) -> None:
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # torch's C++ retries held back too
    assert result.stderr.startswith("metalearn: error: ") and expected in result.stderr, result.stderr


TIMEOUT_S = 1  # seconds: a rank that is not rank 0 waits about twice this (torch retries once)


@pytest.mark.parametrize(
    "rank, expected",
    [
        (1, "rank 1 of 2 could not meet the others at MASTER_ADDR:MASTER_PORT=127.0.0.1:{port}: rank 0 did not answer"),
        (0, "rank 0 of 2 could not meet the others at MASTER_ADDR:MASTER_PORT=127.0.0.1:{port}: not all 2 processes"),
    ],
)
def test_a_rendezvous_nobody_answers_ends_on_one_line_within_the_timeout(rendezvous_env, tmp_path, rank, expected):
    port = free_port()  # closed: no rank 0 listens there, no other rank calls
    rendezvous_env(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    started = time.monotonic()
    result = metalearn_cli("train", "device=cpu", f"device.dist_timeout_s={TIMEOUT_S}", cwd=tmp_path, check=False)
    assert time.monotonic() - started < 60  # the default timeout is 300 s: the given one applied
    assert_one_error_line(result, expected.format(port=port))
    assert f"within device.dist_timeout_s={TIMEOUT_S} s" in result.stderr and "Check that" in result.stderr


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("submitit") is None, reason="the sweep extra: pip install '.[sweep]'"
)
def test_a_slurm_task_whose_rendezvous_fails_ends_on_one_line_that_names_the_job(rendezvous_env, tmp_path):
    port = free_port()
    rendezvous_env(**SLURM_JOB, MASTER_PORT=port)  # a job script's own port, as submitit reads it
    result = metalearn_cli("train", "device=cpu", f"device.dist_timeout_s={TIMEOUT_S}", cwd=tmp_path, check=False)
    assert_one_error_line(result, f"rank 1 of 2 could not meet the others at MASTER_ADDR:MASTER_PORT=127.0.0.1:{port}")
    assert "in a SLURM job MASTER_ADDR is the first node of SLURM_JOB_NODELIST" in result.stderr


@pytest.mark.parametrize(
    "variables, expected",
    [
        ({"RANK": 0, "MASTER_ADDR": "127.0.0.1"}, "MASTER_PORT is not set, so the processes of this run cannot find"),
        ({"RANK": 0}, "MASTER_ADDR and MASTER_PORT are not set"),
        ({"RANK": 0, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "http"}, "MASTER_PORT='http' is not a port"),
        ({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK is not set, but WORLD_SIZE=2 asks for"),
        ({"RANK": 2, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK=2 is not one of 0..1 (WORLD_SIZE=2)"),
        ({"RANK": "first", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, "RANK='first' is not a whole number"),
    ],
)
def test_torchrun_variables_that_cannot_meet_are_one_line_before_anything_waits(
    cli, rendezvous_env, tmp_path, variables, expected
):
    rendezvous_env(WORLD_SIZE=2, **variables)
    result = cli("train", "device=cpu", f"device.dist_timeout_s={TIMEOUT_S}", cwd=tmp_path, check=False)
    assert_one_error_line(result, expected)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("submitit") is None, reason="the sweep extra: pip install '.[sweep]'"
)
@pytest.mark.parametrize("variable, value", [("SLURM_JOB_NODELIST", "node[1-"), ("SLURM_NTASKS", "two")])
def test_slurm_variables_submitit_cannot_read_are_one_line(cli, rendezvous_env, tmp_path, variable, value):
    rendezvous_env(**{**SLURM_JOB, variable: value})
    result = cli("train", "device=cpu", cwd=tmp_path, check=False)
    assert_one_error_line(result, "this SLURM job's tasks could not be read from its SLURM_* variables")
    assert variable in result.stderr


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("submitit") is None, reason="the sweep extra: pip install '.[sweep]'"
)
def test_a_slurm_job_scripts_own_rendezvous_address_is_kept(rendezvous_env):
    rendezvous_env(**{**SLURM_JOB, "SLURM_JOB_NODELIST": "node[1-2]"}, MASTER_ADDR="127.0.0.1", MASTER_PORT=29511)
    ranks = from_environment()
    assert (ranks.rank, ranks.world, ranks.local_rank) == (1, 2, 1)
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("127.0.0.1", "29511")
