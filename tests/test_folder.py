"""data=folder: your own class folders of images, split by lists or by seeded fractions, read once and cached."""

import pytest
import torch
from helpers.data import SHARED_DATA, write_tiny_folder
from helpers.runs import protonet_on
from PIL import Image

from metalearn.config.compose import compose
from metalearn.data import build_dataset
from metalearn.errors import MetalearnError


def pixels(image: Image.Image) -> torch.Tensor:
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)


def folder(tmp_path, *overrides):
    root = write_tiny_folder(tmp_path / "root")
    data = compose(["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *overrides]).data
    return root, build_dataset(data)


def test_each_image_is_read_converted_and_resized_as_pil_does(tmp_path):
    root, grey = folder(tmp_path, "data.image_size=16", "data.split_seed=3")
    _, rgb = folder(tmp_path / "rgb", "data.image_size=16", "data.channels=3", "data.split_seed=3")
    classes = grey.split_lists(sorted(grey.classes()))
    assert sorted(sum(classes.values(), [])) == [f"class{c:02d}" for c in range(8)]  # notes.txt is no class
    split = grey.load_split("train")
    first = sorted((root / classes["train"][0]).iterdir())[0]
    with Image.open(first) as image:
        expected = pixels(image.convert("L").resize((16, 16), Image.BILINEAR))
    assert split.images.shape[1:] == (1, 16, 16) and torch.equal(split.images[0].flatten(), expected)
    assert rgb.load_split("train").images.shape[1:] == (3, 16, 16)
    assert split.labels.tolist() == [c for c in range(len(classes["train"])) for _ in range(6)]


def test_fractions_split_the_classes_by_a_seeded_shuffle(tmp_path):
    _, data = folder(tmp_path, "data.fractions=[0.5,0.25,0.25]")
    names = sorted(data.classes())
    parts = data.split_lists(names)
    assert [len(parts[p]) for p in ("train", "val", "test")] == [4, 2, 2]
    assert sorted(sum(parts.values(), [])) == names
    assert data.split_lists(names) == parts
    other = compose(["data=folder", "data.split_seed=1", "data.fractions=[0.5,0.25,0.25]"]).data
    assert build_dataset(other).split_lists(names) != parts


def test_split_lists_name_the_classes_of_each_part_in_order(tmp_path):
    root = write_tiny_folder(tmp_path / "root")
    for part, classes in {"train": [5, 1, 2], "val": [3, 4], "test": [0, 6, 7]}.items():
        (root / f"{part}.txt").write_text("".join(f"class{c:02d}\n" for c in classes))
    data = build_dataset(compose(["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}"]).data)
    split = data.load_split("train")
    assert split.num_classes == 3 and split.name == "folder root/train"
    with Image.open(sorted((root / "class05").iterdir())[0]) as image:
        expected = pixels(image.convert("L").resize((28, 28), Image.BILINEAR))
    assert torch.equal(split.images[0].flatten(), expected)  # class id 0: the first listed


@pytest.mark.parametrize(
    "lists, message",
    [
        ({"train": ["class00", "nope"], "val": ["class01"], "test": ["class02"]}, "no image folder under"),
        ({"train": ["class00"], "val": ["class00"], "test": ["class02"]}, "the split lists share classes"),
        ({"train": ["class00"], "val": ["class01"]}, "test.txt missing"),
    ],
    ids=["unknown class", "shared class", "missing list"],
)
def test_wrong_split_lists_are_refused_with_what_is_wrong(tmp_path, lists, message):
    root = write_tiny_folder(tmp_path / "root")
    for part, classes in lists.items():
        (root / f"{part}.txt").write_text("\n".join(classes))
    data = build_dataset(compose(["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}"]).data)
    with pytest.raises(MetalearnError, match=message):
        data.load_split("train")


def test_a_damaged_image_is_named(tmp_path):
    root = write_tiny_folder(tmp_path / "root")
    (root / "class03" / "9.png").write_bytes(b"not a png")
    data = build_dataset(compose(["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}"]).data)
    with pytest.raises(MetalearnError, match=r"class03/9.png is not a readable image"):
        for part in ("train", "val", "test"):
            data.load_split(part)


def test_the_cache_is_read_instead_of_the_images_until_they_change(tmp_path, monkeypatch):
    root, data = folder(tmp_path)
    first = data.load_split("train")
    monkeypatch.setattr(type(data), "_read", lambda self, path: pytest.fail(f"read {path} again"))
    assert torch.equal(data.load_split("train").images, first.images)
    monkeypatch.undo()
    name = data.split_lists(sorted(data.classes()))["train"][0]
    Image.new("L", (10, 10), 255).save(root / name / "new.png")
    assert len(data.load_split("train").images) == len(first.images) + 1


def test_a_run_trains_and_evaluates_on_a_folder(cli, tmp_path):
    root = write_tiny_folder(tmp_path / "root", classes=9)
    data = ["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}", "data.fractions=[0.34,0.33,0.33]"]
    out = protonet_on(cli, data, tmp_path, ways=3)
    assert "test accuracy" in out and "folder 3-way 1-shot" in out


@pytest.mark.real_data
@pytest.mark.skipif(not (SHARED_DATA / "MNIST" / "raw").is_dir(), reason=f"no MNIST under {SHARED_DATA}")
def test_protonet_on_a_folder_of_real_mnist_images(cli, tmp_path):
    """The MNIST test images written out as a folder per digit, as a user's own data would be."""
    from helpers.data import write_mnist_folder

    root = write_mnist_folder(SHARED_DATA, tmp_path / "digits", per_digit=60)
    run = tmp_path / "run"
    common = ["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}", "data.fractions=[0.4,0.3,0.3]"]
    task = ["algo=protonet", "task.ways=3", "task.train.ways=4", "task.shots=5", "task.queries=5", "device=cpu"]
    cli(
        "train", *common, *task, "train.steps=30", "train.val_every=30", "train.val_episodes=40", f"hydra.run.dir={run}"
    )
    out = cli("eval", f"run={run}", "eval.episodes=100").stdout
    accuracy = float(out.split("test accuracy ")[1].split("%")[0])
    assert accuracy > 60, out  # 3-way 5-shot on unseen digits; chance is 33%
