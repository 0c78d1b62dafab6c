"""docs/extending.md, executed: its files make a working algorithm, dataset, backbone and logger.

Every code block of the page that names a file is written to a temporary
folder; the page's file list must be exactly those files; then the four new
components train (3 steps straight = 2 steps + resume to 3, the same state and
records), resume without being told the search path again, and evaluate. The
toys pass the contract tests themselves, and the page's list of what a
component inside the package needs is the list the tests ask for.
"""

import importlib.util
import json
import re
import sys

import pytest
import test_contracts as contracts
import torch
from helpers.data import REPO, TINY_DATASETS
from helpers.runs import assert_same_state

from metalearn.config.compose import compose

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


def test_the_page_names_every_step_the_tests_ask_for():
    page = PAGE.read_text()
    checklist = page[page.index("## Inside the package") : page.index("## Outside the package")]
    reference = (REPO / "tests" / "test_config_reference.py").read_text()
    assert "`python scripts/config_reference.py`" in checklist and "python scripts/config_reference.py" in reference
    assert "`docs/configuration.md`" in checklist
    contract_message = "has no writer of small files in tests/helpers/data.py TINY_DATASETS"
    assert contract_message in checklist and contract_message in (REPO / "tests" / "test_contracts.py").read_text()
    assert "`TINY_DATASETS`" in checklist and "`tests/helpers/data.py`" in checklist
    assert "`README.md`" in checklist and "`tests/test_readme.py`" in checklist
    assert "`TINY_ALGO`" in checklist and "`tests/helpers/runs.py`" in checklist


def test_every_path_the_page_names_exists():
    """`metalearn/algorithms/<name>.py` stands for a file of that folder: the folder must exist."""
    named = re.findall(
        r"`((?:metalearn|conf|tests|scripts|docs)/[^`\s]*|README\.md|pyproject\.toml)`", PAGE.read_text()
    )
    assert len(named) > 15
    missing = [path for path in named if not (REPO / path.split("<")[0]).exists()]
    assert not missing


def config_reference():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    return generator.render()


def test_the_reference_names_each_algorithm_dataset_and_backbone_yaml_and_no_logger():
    """So a new YAML of those three groups changes docs/configuration.md (step 3), and a logger's does not."""
    rendered = config_reference()
    for group in ("algo", "data", "model"):
        for yaml in (REPO / "conf" / group).glob("*.yaml"):
            assert f"`{group}={yaml.stem}`" in rendered
    assert not [y.stem for y in (REPO / "conf" / "logger").glob("*.yaml") if f"logger={y.stem}`" in rendered]


def test_the_toys_meet_the_contract_tests(toys, tmp_path, monkeypatch):
    """The contract tests, run on the walkthrough's components; the dataset's only once it has a writer."""
    search = f"hydra.searchpath=[file://{toys / 'toys' / 'conf'}]"
    monkeypatch.setattr(contracts, "compose", lambda overrides, **kw: compose([search, *overrides], **kw))
    contracts.test_algorithm_settings_and_constructor_agree("cosine")
    for shape in [(1, 28, 28), (3, 32, 32)]:
        contracts.test_backbone_meets_the_contract_for_any_image("mlp", shape)
    with pytest.raises(pytest.fail.Exception, match="data=tensors has no writer of small files"):
        contracts.data_config("tensors", tmp_path / "without")

    def tiny_tensors(base):
        write_tensor_dataset(base / "root")
        return ["data=tensors", f"data.root={base / 'root'}", f"data.cache_dir={base / 'cache'}"]

    monkeypatch.setitem(TINY_DATASETS, "tensors", tiny_tensors)
    contracts.test_dataset_parts_meet_the_class_split_contract("tensors", tmp_path / "parts")
    contracts.test_dataset_without_its_files_says_what_is_missing("tensors", tmp_path / "missing")
