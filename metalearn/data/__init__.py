"""Datasets as uint8 tensors, their class splits, and the on-device episode sampler."""

from metalearn.data import mnist, omniglot
from metalearn.data.sampler import Episodes, EpisodeSampler, LabelledImages
from metalearn.data.split import ClassSplit
from metalearn.errors import MetalearnError

DATASETS = {"omniglot": omniglot.load_split, "mnist": mnist.load_split}


def load_split(data_cfg, part: str) -> ClassSplit:
    """Part 'train', 'val' or 'test' of the dataset data_cfg names."""
    if data_cfg.name not in DATASETS:
        raise MetalearnError(f"data={data_cfg.name} is not a known dataset; choose one of: {', '.join(DATASETS)}.")
    return DATASETS[data_cfg.name](data_cfg, part)


__all__ = ["ClassSplit", "Episodes", "EpisodeSampler", "LabelledImages", "load_split"]
