"""docs/extending.md, executed: its files make a working algorithm, dataset, backbone and logger.

Every code block of the page that names a file is written to a temporary
folder; the page's file list must be exactly those files; then the four new
components train (3 steps straight = 2 steps + resume to 3, the same state and
records), resume without being told the search path again, and evaluate.
"""

import json
import re
import sys

import pytest
import torch
from helpers.data import REPO
from helpers.runs import assert_same_state

PAGE = REPO / "docs" / "extending.md"
BLOCK = re.compile(r"^```\w+ file=(?P<path>\S+)\n(?P<body>.*?)^```$", re.M | re.S)


def page_files() -> dict:
    return {m.group("path"): m.group("body") for m in BLOCK.finditer(PAGE.read_text())}


def test_the_page_lists_exactly_the_files_it_shows():
    listing = re.search(r"complete list:\n\n```\n(.*?)```", PAGE.read_text(), re.S).group(1)
    listed = [line.split()[0] for line in listing.splitlines() if line.strip()]
    assert sorted(listed) == sorted(page_files())
    assert len(listed) == 8


def write_tensor_dataset(root, channels=3, size=12, per_class=6):
    """Classes 0-5 train, 6-8 val, 9-11 test; 3-channel 12x12 images, so nothing may assume Omniglot's shape."""
    generator = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    for part, classes in (("train", 6), ("val", 3), ("test", 3)):
        images = torch.randint(0, 256, (classes * per_class, channels, size, size), generator=generator)
        labels = torch.arange(classes).repeat_interleave(per_class)
        torch.save({"images": images.to(torch.uint8), "labels": labels}, root / f"{part}.pt")


@pytest.fixture
def toys(tmp_path, monkeypatch):
    for path, body in page_files().items():
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path / "toys"))
    yield tmp_path
    for name in ("toy_cosine", "toy_tensors", "toy_mlp", "toy_csv"):
        sys.modules.pop(name, None)


def test_the_walkthrough_trains_resumes_and_evaluates(cli, toys, tmp_path):
    write_tensor_dataset(tmp_path / "tensors")
    common = [
        "algo=cosine",
        "data=tensors",
        f"data.root={tmp_path / 'tensors'}",
        "model=mlp",
        "logger=csv",
        f"hydra.searchpath=[file://{toys / 'toys' / 'conf'}]",
        "task.queries=2",
        "task.shots=2",
        "task.ways=3",
        "train.val_every=2",
        "train.val_episodes=4",
        "train.ckpt_every=1",
        "train.log_every=1",
        "eval.episodes=5",
    ]
    straight, split = tmp_path / "straight", tmp_path / "split"
    cli("train", *common, "train.steps=3", f"hydra.run.dir={straight}", cwd=tmp_path)
    cli("train", *common, "train.steps=2", f"hydra.run.dir={split}", cwd=tmp_path)
    cli("train", f"resume={split}", "train.steps=3", cwd=tmp_path)  # the search path comes from the run folder

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == 3 and a["config"]["algo"]["name"] == "cosine"
    assert_same_state(a["algo"], b["algo"])
    assert a["algo"]["model"]["features.1.weight"].shape == (32, 3 * 12 * 12)  # built for the dataset's images

    def records(run):
        return [
            {k: v for k, v in json.loads(line).items() if k not in ("time", "tasks_per_s")}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert records(straight) == records(split)
    csv_rows = (split / "metrics.csv").read_text().splitlines()
    assert csv_rows[0] == "step,split,loss,accuracy"
    assert [row.split(",")[:2] for row in csv_rows[1:]] == [[str(r["step"]), r["split"]] for r in records(split)]

    out = cli("eval", f"run={split}", cwd=tmp_path).stdout
    assert re.search(r"test accuracy \d+\.\d\d% ± \d+\.\d\d \(5 episodes, tensors 3-way 2-shot, best\.pt\)", out)


def test_the_toy_settings_are_checked(cli, toys, tmp_path):
    write_tensor_dataset(tmp_path / "tensors")
    result = cli(
        "train",
        "algo=cosine",
        "algo.scale=0",
        "data=tensors",
        f"data.root={tmp_path / 'tensors'}",
        "model=mlp",
        f"hydra.searchpath=[file://{toys / 'toys' / 'conf'}]",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1 and "algo.scale must be a finite number above 0 (got 0.0)" in result.stderr


def test_a_backbone_without_batch_norm_refuses_the_inductive_mode(cli, toys, tmp_path):
    write_tensor_dataset(tmp_path / "tensors")
    result = cli(
        "train",
        "algo=cosine",
        "data=tensors",
        f"data.root={tmp_path / 'tensors'}",
        "model=mlp",
        "+model.bn=inductive",  # its YAML lists no `bn`: it has no BatchNorm
        f"hydra.searchpath=[file://{toys / 'toys' / 'conf'}]",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 1 and "model=mlp has no BatchNorm layers" in result.stderr
