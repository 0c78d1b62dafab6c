"""A split of a dataset: images of the classes it may draw episodes from."""

from dataclasses import dataclass
from pathlib import Path

import torch

from metalearn.errors import MetalearnError


@dataclass
class ClassSplit:
    images: torch.Tensor  # uint8 [num_images, channels, height, width], ink (foreground) high
    labels: torch.Tensor  # int64 [num_images], class ids 0..num_classes-1
    name: str  # e.g. "omniglot/vinyals/train", used in messages
    part: str = ""  # "train", "val" or "test": one of the keys each episode is derived from

    @property
    def image_shape(self) -> tuple:
        """(channels, height, width): what the backbone is built for."""
        return tuple(self.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    def class_counts(self) -> torch.Tensor:
        return torch.bincount(self.labels, minlength=self.num_classes)


def read_class_list(path: Path) -> list[str]:
    """The class names of a split list, one per line (blank lines skipped); a file that is not text is a
    MetalearnError naming it."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise MetalearnError(f"{path} is not a text file of class names, one per line ({err}).") from None
    return [line.strip() for line in text.splitlines() if line.strip()]
