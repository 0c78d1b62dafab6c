"""Tiny runs of any algorithm: their overrides, and train == train + resume, then evaluate."""

import json
import re
from pathlib import Path

import torch

# Per algorithm: overrides that make a run tiny (the tiny train split has 12 classes).
TINY_ALGO = {
    "maml": ["algo.inner_steps_eval=2"],
    "fomaml": ["algo.inner_steps_eval=2"],
    "anil": ["algo.inner_steps_eval=2"],
    "metasgd": [],
    # Epochs of one step: the multi-step loss's weights change at each; the cosine spans the 3-step run.
    "mamlpp": ["algo.inner_steps=2", "algo.inner_steps_eval=2", "algo.epoch_steps=1", "algo.anneal_steps=3"],
    # The outer step anneals over 3 steps: the resume test's runs of 2 and 3 steps share one schedule.
    "reptile": [
        "algo.inner_steps=2",
        "algo.inner_batch=5",
        "algo.inner_steps_eval=2",
        "algo.inner_batch_eval=3",
        "algo.anneal_steps=3",
    ],
    "protonet": ["task.train.ways=5"],
    "finetune": ["algo.batch_size=8", "algo.head_steps=5"],
}


def overrides_for(algo: str, tiny_overrides: list) -> list:
    plain = [o for o in tiny_overrides if not o.startswith("algo.")]
    return [f"algo={algo}", *plain, *TINY_ALGO.get(algo, [])]


def assert_same_state(a, b, where="algo"):
    """Nested checkpoint contents are equal, tensors exactly."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def train_resume_eval(cli, overrides: list, tmp_path: Path, name: str) -> Path:
    """A 3-step run equals a 2-step run resumed to 3 steps; the resumed run evaluates."""
    straight, split = tmp_path / f"{name}-straight", tmp_path / f"{name}-split"
    common = [*overrides, "train.val_every=2", "train.ckpt_every=1"]
    cli("train", *common, "train.steps=3", f"hydra.run.dir={straight}", cwd=tmp_path)
    cli("train", *common, "train.steps=2", f"hydra.run.dir={split}", cwd=tmp_path)
    cli("train", f"resume={split}", "train.steps=3", cwd=tmp_path)
    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 3
    assert_same_state(a["algo"], b["algo"])

    timings = ("time", "tasks_per_s", "images_per_s")

    def strip(run):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in lines]

    assert strip(straight) == strip(split)

    out = cli("eval", f"run={split}", cwd=tmp_path).stdout
    assert re.search(r"test accuracy \d+\.\d\d% ± \d+\.\d\d \(10 episodes, omniglot 5-way 1-shot, best\.pt\)", out)
    (record,) = [json.loads(line) for line in (split / "evals.jsonl").read_text().splitlines()]
    assert record["algo"] == overrides[0].split("=")[1] and 0 <= record["accuracy"] <= 1
    return split


def protonet_on(cli, data_overrides: list, tmp_path: Path, ways: int = 5) -> str:
    """A 2-step ProtoNet run on a dataset (its data.* overrides), then `metalearn eval`: the eval's output."""
    run = tmp_path / "run"
    tiny = ["algo=protonet", f"task.ways={ways}", f"task.train.ways={ways}", "task.train.queries=2", "task.queries=2"]
    tiny += ["model.hidden=8", "device=cpu", "train.steps=2", "train.val_every=2", "train.val_episodes=4"]
    cli("train", *data_overrides, *tiny, f"hydra.run.dir={run}", cwd=tmp_path)
    return cli("eval", f"run={run}", "eval.episodes=10", cwd=tmp_path).stdout


def tiny_exported_run(tiny_data: dict, base: Path) -> tuple:
    """A one-step MAML run on the tiny data under `base`, and its best checkpoint exported: (run, .safetensors)."""
    from helpers.cli import metalearn_in_process

    run, out = base / "run", base / "model.safetensors"
    metalearn_in_process(
        "train",
        f"data.root={tiny_data['root']}",
        f"data.split={tiny_data['split']}",
        f"data.cache_dir={tiny_data['cache']}",
        "task.queries=3",
        "model.hidden=8",
        "train.steps=1",
        "train.meta_batch_size=1",
        "train.val_episodes=2",
        "eval.episodes=4",
        "algo.inner_steps_eval=1",
        "device=cpu",
        f"hydra.run.dir={run}",
        cwd=base,
    )
    metalearn_in_process("export", f"run={run}", f"out={out}", cwd=base)
    return run, out
