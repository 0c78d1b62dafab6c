"""data=miniimagenet from its two shared layouts: images with the Ravi & Larochelle CSVs, or the pickles."""

import pickle

import pytest
import torch
from helpers.data import MINI_CLASSES, mini_class, write_tiny_miniimagenet, write_tiny_miniimagenet_pickles
from helpers.runs import protonet_on
from PIL import Image

from metalearn.config.compose import compose
from metalearn.data import build_dataset
from metalearn.errors import MetalearnError


def dataset(root, tmp_path, *overrides):
    data = compose(["data=miniimagenet", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", *overrides])
    return build_dataset(data.data)


def test_images_and_csvs_are_read_resized_and_labelled_in_csv_order(tmp_path):
    root = write_tiny_miniimagenet(tmp_path / "root")
    split = dataset(root, tmp_path).load_split("val")
    assert split.image_shape == (3, 84, 84) and split.num_classes == MINI_CLASSES["val"]
    assert split.class_counts().tolist() == [3] * MINI_CLASSES["val"]
    with Image.open(root / "miniimagenet" / "images" / f"{mini_class('val', 0)}00000001.jpg") as image:
        expected = (
            torch.frombuffer(
                bytearray(image.convert("RGB").resize((84, 84), Image.BILINEAR).tobytes()), dtype=torch.uint8
            )
            .view(84, 84, 3)
            .permute(2, 0, 1)
        )
    assert torch.equal(split.images[0], expected)


def test_the_pickles_give_each_class_its_rows(tmp_path):
    root = write_tiny_miniimagenet_pickles(tmp_path / "root")
    split = dataset(root, tmp_path).load_split("train")
    raw = pickle.loads((root / "miniimagenet" / "mini-imagenet-cache-train.pkl").read_bytes())
    rows = raw["class_dict"][mini_class("train", 2)]
    mine = split.images[split.labels == 2]
    assert torch.equal(mine, torch.as_tensor(raw["image_data"][rows]).permute(0, 3, 1, 2))


def test_a_cached_split_is_not_read_again(tmp_path, monkeypatch):
    root = write_tiny_miniimagenet(tmp_path / "root")
    first = dataset(root, tmp_path).load_split("test")
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("an image was read again"))
    assert torch.equal(dataset(root, tmp_path).load_split("test").images, first.images)


def test_missing_files_say_which_to_place_where(tmp_path):
    with pytest.raises(MetalearnError, match=r"miniimagenet/images/\*.jpg with .*train.csv.*mini-imagenet-cache"):
        dataset(tmp_path / "nothing", tmp_path).load_split("train")
    with pytest.raises(MetalearnError, match="cannot be downloaded automatically"):
        dataset(tmp_path, tmp_path, "data.download=true")


def test_an_image_the_csv_lists_but_the_folder_lacks_is_named(tmp_path):
    root = write_tiny_miniimagenet(tmp_path / "root")
    (root / "miniimagenet" / "images" / f"{mini_class('test', 1)}00000002.jpg").unlink()
    with pytest.raises(MetalearnError, match=f"lists {mini_class('test', 1)}00000002.jpg, which is not in"):
        dataset(root, tmp_path).load_split("test")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    base = tmp_path / "root" / "miniimagenet"
    base.mkdir(parents=True)

    class Payload:
        def __reduce__(self):
            return (exec, ("open('ran', 'w').write('x')",))

    (base / "mini-imagenet-cache-train.pkl").write_bytes(pickle.dumps({"image_data": Payload()}))
    with pytest.raises(MetalearnError, match="is not a miniImageNet pickle"):
        dataset(tmp_path / "root", tmp_path).load_split("train")
    assert not (tmp_path / "ran").exists()


def test_a_run_trains_and_evaluates_on_miniimagenet(cli, tmp_path):
    root = write_tiny_miniimagenet_pickles(tmp_path / "root", size=32)
    data = ["data=miniimagenet", f"data.root={root}", f"data.cache_dir={tmp_path / 'c'}", "data.image_size=32"]
    assert "miniimagenet 5-way 1-shot" in protonet_on(cli, data, tmp_path)
