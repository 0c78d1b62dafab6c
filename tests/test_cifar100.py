"""data=cifarfs and data=fc100: CIFAR-100's python pickles, split by the shipped class lists."""

import pickle

import pytest
import torch
from helpers.data import cifar100_names, write_tiny_cifar100
from helpers.runs import protonet_on

from metalearn.config.compose import compose
from metalearn.data import build_dataset
from metalearn.errors import MetalearnError


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_tiny_cifar100(tmp_path_factory.mktemp("cifar") / "root")


def dataset(root, name="cifarfs", *overrides):
    return build_dataset(compose([f"data={name}", f"data.root={root}", *overrides]).data)


@pytest.mark.parametrize("name, sizes", [("cifarfs", (64, 16, 20)), ("fc100", (60, 20, 20))])
def test_the_splits_have_their_papers_class_counts_and_share_no_class(cifar, name, sizes):
    data = dataset(cifar, name)
    parts = {part: data.load_split(part) for part in ("train", "val", "test")}
    assert tuple(parts[p].num_classes for p in ("train", "val", "test")) == sizes
    assert all(
        split.image_shape == (3, 32, 32) and split.class_counts().tolist() == [3] * split.num_classes
        for split in parts.values()
    )  # CIFAR-100's train (2 each here) and test (1) pooled
    classes = [set(data._classes(p)) for p in ("train", "val", "test")]
    assert not (classes[0] & classes[1] or classes[0] & classes[2] or classes[1] & classes[2])
    assert len(set.union(*classes)) == 100


def test_images_are_the_pickles_rows_as_channel_planes(cifar):
    with open(cifar / "cifar-100-python" / "train", "rb") as handle:
        raw = pickle.load(handle, encoding="bytes")
    data = dataset(cifar)
    split = data.load_split("train")
    first = data._classes("train")[0]  # class id 0 is the list's first class
    label = cifar100_names().index(first)
    row = raw[b"data"][raw[b"fine_labels"].index(label)]
    assert torch.equal(split.images[split.labels == 0][0], torch.as_tensor(row).view(3, 32, 32))


def test_a_file_that_would_run_code_is_refused(tmp_path):
    root = write_tiny_cifar100(tmp_path / "root")

    class Payload:
        def __reduce__(self):
            return (exec, ("open('ran', 'w').write('x')",))

    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps({b"fine_label_names": Payload()}))
    with pytest.raises(MetalearnError, match="meta is not a CIFAR-100 python file .*builtins.exec is not allowed"):
        dataset(root).load_split("train")
    assert not (tmp_path / "ran").exists()


def test_your_own_split_lists_of_fine_classes(cifar, tmp_path):
    for part, classes in {"train": ["apple", "bee", "cup"], "val": ["fox", "man"], "test": ["rose", "tank"]}.items():
        (tmp_path / f"{part}.txt").write_text("\n".join(classes))
    split = dataset(cifar, "cifarfs", f"data.split={tmp_path}").load_split("val")
    assert split.num_classes == 2 and len(split.images) == 6
    (tmp_path / "test.txt").write_text("rose\nunicorn\n")
    with pytest.raises(MetalearnError, match="unknown CIFAR-100 classes: \\['unicorn'\\]"):
        dataset(cifar, "cifarfs", f"data.split={tmp_path}").load_split("test")


def test_a_run_trains_and_evaluates_on_cifarfs(cli, cifar, tmp_path):
    assert "cifarfs 5-way 1-shot" in protonet_on(cli, ["data=cifarfs", f"data.root={cifar}"], tmp_path)
