"""The dataset contract: a component that loads the parts of a class split.

conf/data/<name>.yaml names the class with `_target_`; the class's `Settings`
dataclass types and checks the data.* keys, and the runner constructs it with
each setting by name. `load_split(part)` returns a ClassSplit: uint8 images
[N, C, H, W] (ink or foreground high) and class ids 0..C-1 for part "train",
"val" or "test", with disjoint classes between train and the other two. The
backbone takes its input channels and image size from those images.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

from omegaconf import MISSING

from metalearn.config.settings import SettingError, at_least
from metalearn.data.split import ClassSplit


@dataclass
class DataSettings:
    """The keys every dataset has; its own schema adds its settings, each checked in __post_init__."""

    _target_: str = MISSING  # the Dataset subclass
    name: str = MISSING  # how runs, records and messages name it
    root: str = "data"  # the folder holding its files; never written to
    download: bool = False  # fetch with torchvision when the files are missing
    cache_dir: str | None = None  # decoded-tensor cache; null: $METALEARN_CACHE, else ~/.cache/metalearn
    # Per-channel normalisation of images scaled to [0, 1]: (x - mean) / std; null: none. Set for RGB sets.
    mean: list[float] | None = None
    std: list[float] | None = None
    # Pretraining batches (finetune, distill) randomly cropped after padding by crop_padding, and flipped.
    augment: bool = False
    crop_padding: int = 4

    def __post_init__(self):
        check_preprocessing(self)


# The preprocessing keys: the sampler applies them, a dataset's constructor does not take them.
PREPROCESSING = ("mean", "std", "augment", "crop_padding")


def check_preprocessing(settings) -> None:
    if (settings.mean is None) != (settings.std is None):
        raise SettingError("mean", "and data.std go together: give both (one value per channel) or neither.")
    if settings.std is not None and (len(settings.std) != len(settings.mean) or min(settings.std) <= 0):
        raise SettingError("std", f"must be positive, one per channel like data.mean (got {settings.std}).")
    at_least(settings, "crop_padding", 0)


class Dataset(ABC):
    Settings = DataSettings

    @abstractmethod
    def load_split(self, part: str) -> ClassSplit:
        """Part "train", "val" or "test"; a missing or damaged file is a MetalearnError that says what to do."""
