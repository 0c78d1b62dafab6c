"""Datasets as uint8 tensors, their class splits, and the on-device episode sampler."""

from metalearn.config.settings import component_class, construct, settings_of
from metalearn.data.base import PREPROCESSING, Dataset, DataSettings
from metalearn.data.sampler import Episodes, EpisodeSampler, LabelledImages, TaskKeys
from metalearn.data.split import ClassSplit


def build_dataset(data_cfg) -> Dataset:
    """The dataset data_cfg names with `_target_`, its settings checked."""
    skip = ("_target_", "name", *PREPROCESSING)  # the sampler's (metalearn.data.transforms)
    return construct(component_class(data_cfg, "data"), settings_of(data_cfg, "data"), skip=skip)


def load_split(data_cfg, part: str) -> ClassSplit:
    """Part 'train', 'val' or 'test' of the dataset data_cfg names."""
    return build_dataset(data_cfg).load_split(part)


__all__ = [
    "ClassSplit",
    "DataSettings",
    "Dataset",
    "Episodes",
    "EpisodeSampler",
    "LabelledImages",
    "TaskKeys",
    "build_dataset",
    "load_split",
]
