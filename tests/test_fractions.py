"""data.fractions: each of train, val and test gets its own share of a folder's classes, every image of them."""

import pytest
from helpers.data import write_tiny_folder

from metalearn.config.compose import compose
from metalearn.data import build_dataset

PARTS = ("train", "val", "test")


@pytest.mark.parametrize(
    "fractions, classes",
    [([0.5, 0.3, 0.2], [5, 3, 2]), ([0.2, 0.1, 0.7], [2, 1, 7])],
    ids=["val above test", "val below test"],
)
def test_each_part_gets_the_classes_of_its_own_fraction(tmp_path, fractions, classes):
    root = write_tiny_folder(tmp_path / "root", classes=10, per_class=2)
    overrides = ["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}", f"data.fractions={fractions}"]
    data = build_dataset(compose(overrides).data)
    splits = {part: data.load_split(part) for part in PARTS}
    assert [splits[part].num_classes for part in PARTS] == classes
    assert [splits[part].class_counts().tolist() for part in PARTS] == [[2] * count for count in classes]
    names = data.split_lists(sorted(data.classes()))
    assert sorted(sum((names[part] for part in PARTS), [])) == [f"class{c:02d}" for c in range(10)]  # each once
