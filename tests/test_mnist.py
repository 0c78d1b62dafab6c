"""MNIST few-shot splits from tiny generated IDX files, and cross-domain evaluation."""

import json

import pytest
import torch
from helpers.data import write_idx, write_tiny_mnist
from omegaconf import OmegaConf

from metalearn.data import load_split
from metalearn.errors import MetalearnError


def mnist_cfg(root, cache, train=(0, 1, 2, 3, 4), val=(5, 6, 7, 8, 9), test=(5, 6, 7, 8, 9)):
    return OmegaConf.create(
        {
            "_target_": "metalearn.data.mnist.MNIST",
            "name": "mnist",
            "root": str(root),
            "split": "digits",
            "cache_dir": str(cache),
            "download": False,
            "classes": {"train": list(train), "val": list(val), "test": list(test)},
        }
    )


@pytest.fixture(scope="module")
def tiny_mnist(tmp_path_factory):
    return write_tiny_mnist(tmp_path_factory.mktemp("mnist"))


def image_ids(split):
    pixels = split.images[:, 0, 0].long()
    return set(zip(pixels[:, 0].tolist(), (pixels[:, 1] + 256 * pixels[:, 2]).tolist(), strict=False))


def test_parts_are_class_and_image_disjoint(tiny_mnist, tmp_path):
    cfg = mnist_cfg(tiny_mnist, tmp_path / "cache")
    train, val, test = (load_split(cfg, part) for part in ("train", "val", "test"))
    assert train.images.shape == (5 * 25, 1, 28, 28) and train.num_classes == 5
    assert val.class_counts().tolist() == [25] * 5 and test.class_counts().tolist() == [22] * 5
    # train and val come from MNIST's training images, test from its test images
    assert {pool for pool, _ in image_ids(train) | image_ids(val)} == {1}
    assert {pool for pool, _ in image_ids(test)} == {2}
    assert not image_ids(train) & image_ids(val)
    # labels follow the listed digits: class 0 of val is digit 5 (blob value 125)
    assert int(val.images[val.labels == 0][0, 0, 12, 12]) == 125
    assert int(train.images[train.labels == 4][0, 0, 12, 12]) == 100


def test_uncompressed_files_read_the_same(tiny_mnist, tmp_path):
    plain = write_tiny_mnist(tmp_path / "plain", compress=False)
    a = load_split(mnist_cfg(tiny_mnist, tmp_path / "c1"), "test")
    b = load_split(mnist_cfg(plain, tmp_path / "c2"), "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_custom_class_lists_and_overlap_errors(tiny_mnist, tmp_path):
    cfg = mnist_cfg(tiny_mnist, tmp_path / "cache", train=(0, 2, 4, 6, 8), val=(1, 3), test=(5, 7, 9))
    assert load_split(cfg, "val").num_classes == 2
    with pytest.raises(MetalearnError, match=r"share the digits \[4\]"):
        load_split(mnist_cfg(tiny_mnist, tmp_path / "cache", test=(4, 5, 6)), "train")
    with pytest.raises(MetalearnError, match="distinct digits from 0 to 9"):
        load_split(mnist_cfg(tiny_mnist, tmp_path / "cache", val=(5, 12)), "train")


def test_nothing_is_written_into_the_data_root(tiny_mnist, tmp_path):
    before = sorted(p.name for p in tiny_mnist.rglob("*"))
    load_split(mnist_cfg(tiny_mnist, tmp_path / "cache"), "train")
    assert sorted(p.name for p in tiny_mnist.rglob("*")) == before
    assert list((tmp_path / "cache").glob("mnist-*.pt"))


def test_missing_and_corrupt_files_are_clear_errors(tiny_mnist, tmp_path):
    with pytest.raises(MetalearnError, match="t10k-images-idx3-ubyte.gz.*data.download=true"):
        load_split(mnist_cfg(tmp_path, tmp_path / "cache"), "train")
    broken = write_tiny_mnist(tmp_path / "broken")
    write_idx(broken / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz", 9999, torch.zeros(250), True)
    with pytest.raises(MetalearnError, match="not an MNIST labels file"):
        load_split(mnist_cfg(broken, tmp_path / "cache2"), "train")


def test_train_and_eval_on_mnist_then_cross_domain(cli, tiny_overrides, tiny_mnist, tmp_path):
    mnist_args = [
        "data=mnist",
        f"data.root={tiny_mnist}",
        f"data.cache_dir={tmp_path}/cache",
        "task.queries=3",
        "model.hidden=8",
        "train.steps=2",
        "train.meta_batch_size=2",
        "train.val_episodes=4",
        "device=cpu",
    ]
    run = tmp_path / "mnist_run"
    cli("train", "algo=fomaml", *mnist_args, f"hydra.run.dir={run}", cwd=tmp_path)
    out = cli("eval", f"run={run}", "eval.episodes=8", cwd=tmp_path).stdout
    assert "(8 episodes, mnist 5-way 1-shot, best.pt)" in out

    omniglot_run = tmp_path / "omniglot_run"
    cli("train", *tiny_overrides, "train.steps=1", "task.shots=2", f"hydra.run.dir={omniglot_run}", cwd=tmp_path)
    out = cli("eval", f"run={omniglot_run}", "data=mnist", f"data.root={tiny_mnist}", cwd=tmp_path).stdout
    assert "mnist 5-way 2-shot" in out
    record = json.loads((omniglot_run / "evals.jsonl").read_text().splitlines()[-1])
    assert record["dataset"] == "mnist" and record["episodes"] == 10  # the run's own eval.episodes
    # the run's task shape is kept: its shots and queries, not the MNIST config's defaults
    assert (record["ways"], record["shots"], record["queries"]) == (5, 2, 3)
    too_many = cli(
        "eval", f"run={omniglot_run}", "data=mnist", f"data.root={tiny_mnist}", "task.ways=6", cwd=tmp_path, check=False
    )
    assert too_many.returncode != 0 and "choose task.ways <= 5" in too_many.stderr
