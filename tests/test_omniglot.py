"""Omniglot loading, caching and the shipped class splits."""

import shutil
from pathlib import Path

import pytest
import torch
from helpers.data import TINY_SPLIT, write_tiny_omniglot, write_tiny_split
from omegaconf import OmegaConf

from metalearn.data import load_split, omniglot
from metalearn.errors import MetalearnError


def data_cfg(root, split, cache, **extra):
    return OmegaConf.create(
        {
            "_target_": "metalearn.data.omniglot.Omniglot",
            "name": "omniglot",
            "root": str(root),
            "split": str(split),
            "cache_dir": str(cache),
            "download": False,
            **extra,
        }
    )


def listing(folder: Path):
    return sorted((str(p.relative_to(folder)), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def test_split_images_are_28px_ink_high_and_rotated(tiny_data, tmp_path):
    cfg = data_cfg(tiny_data["root"], tiny_data["split"], tmp_path / "cache")
    train = load_split(cfg, "train")
    assert train.images.shape == (12 * 20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.num_classes == 12 and train.class_counts().tolist() == [20] * 12
    # ink is high: the generated drawings are mostly white paper -> mostly 0 after inversion
    assert (train.images == 0).float().mean() > 0.6
    # classes 0 and 1 are character01 at 0 and 90 degrees
    assert torch.equal(train.images[20:40], torch.rot90(train.images[0:20], 1, dims=(-2, -1)))


def test_zip_and_extracted_folders_give_the_same_tensor(tiny_data, tmp_path):
    extracted = write_tiny_omniglot(tmp_path / "extracted", as_zip=False)
    a = load_split(data_cfg(tiny_data["root"], tiny_data["split"], tmp_path / "c1"), "test")
    b = load_split(data_cfg(extracted, tiny_data["split"], tmp_path / "c2"), "test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_decoded_tensor_is_cached_outside_the_data_root(tiny_data, tmp_path, monkeypatch):
    root = tmp_path / "root"
    shutil.copytree(tiny_data["root"], root)
    before = listing(root)
    cfg = data_cfg(root, tiny_data["split"], tmp_path / "cache")
    first = load_split(cfg, "val")
    assert listing(root) == before, "data.root must never be written to"
    assert list((tmp_path / "cache").glob("omniglot-*.pt"))

    def no_decoding(*_):
        raise AssertionError("decoded again although a cache exists")

    monkeypatch.setattr(omniglot, "_decode_all", no_decoding)
    assert torch.equal(load_split(cfg, "val").images, first.images)


def test_missing_data_names_the_files_and_the_download_option(tmp_path):
    with pytest.raises(MetalearnError) as err:
        load_split(data_cfg(tmp_path, "vinyals", tmp_path / "cache"), "train")
    message = str(err.value)
    assert "images_background.zip" in message and "images_evaluation.zip" in message
    assert str(tmp_path / "omniglot-py") in message and "data.download=true" in message


def test_failed_download_says_what_to_place_where(tmp_path, monkeypatch):
    import torchvision.datasets

    class OfflineOmniglot:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets, "Omniglot", OfflineOmniglot)
    with pytest.raises(MetalearnError, match="download failed.*network is unreachable.*images_background.zip"):
        load_split(data_cfg(tmp_path, "vinyals", tmp_path / "cache", download=True), "train")


def test_truncated_archive_is_a_clear_error(tiny_data, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_data["root"], root)
    archive = root / "omniglot-py" / "images_evaluation.zip"
    archive.write_bytes(archive.read_bytes()[:1000])
    with pytest.raises(MetalearnError, match="truncated"):
        load_split(data_cfg(root, tiny_data["split"], tmp_path / "cache"), "test")


def test_unknown_split_lists_the_choices(tiny_data, tmp_path):
    with pytest.raises(MetalearnError, match="vinyals, lake"):
        load_split(data_cfg(tiny_data["root"], "nosuchsplit", tmp_path / "cache"), "train")


def test_split_naming_a_missing_character_is_an_error(tiny_data, tmp_path):
    split = write_tiny_split(tmp_path / "split")
    (split / "train.txt").write_text("Gamma/character01/rot000\n")
    with pytest.raises(MetalearnError, match="Gamma/character01"):
        load_split(data_cfg(tiny_data["root"], split, tmp_path / "cache"), "train")


@pytest.mark.parametrize("split,counts", [("vinyals", (4112, 688, 1692)), ("lake", (792, 172, 659))])
def test_shipped_splits_are_disjoint_and_complete(split, counts):
    parts = {part: omniglot.split_classes(split, part) for part in ("train", "val", "test")}
    assert tuple(len(parts[p]) for p in ("train", "val", "test")) == counts
    characters = {p: {c.rsplit("/", 1)[0] for c in classes} for p, classes in parts.items()}
    assert not characters["train"] & characters["val"]
    assert not characters["train"] & characters["test"]
    assert not characters["val"] & characters["test"]
    assert sum(len(c) for c in characters.values()) == 1623  # every character, once
    if split == "lake":  # alphabets are disjoint too
        alphabets = {p: {c.split("/")[0] for c in chars} for p, chars in characters.items()}
        assert not alphabets["train"] & alphabets["test"] and not alphabets["val"] & alphabets["test"]


def test_tiny_split_fixture_matches_its_lists(tiny_data, tmp_path):
    cfg = data_cfg(tiny_data["root"], tiny_data["split"], tmp_path / "cache")
    for part, classes in TINY_SPLIT.items():
        assert load_split(cfg, part).num_classes == len(classes)
