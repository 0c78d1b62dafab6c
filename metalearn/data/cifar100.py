"""CIFAR-100 split by class for few-shot learning: CIFAR-FS and FC100.

Read from torchvision's layout, `<data.root>/cifar-100-python/{train,test,meta}`
(the python pickles of the CIFAR-100 archive), without writing there. Both of
CIFAR-100's sets are pooled (600 images per class) and the classes are split
by the lists shipped in metalearn/data/splits/cifar100/ (see SOURCES there):
`cifarfs` (Bertinetto et al. 2019: 64 / 16 / 20 classes) or `fc100` (Oreshkin
et al. 2018: by superclass, 60 / 20 / 20), or a folder with your own
train.txt, val.txt, test.txt of fine class names. Images are 32x32 RGB.

The pickles are read with metalearn.data.pickles, so a tampered file cannot
run code.
"""

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from metalearn.data.base import Dataset, DataSettings
from metalearn.data.pickles import PickleFile, describe
from metalearn.data.split import ClassSplit, read_class_list
from metalearn.errors import MetalearnError

FILES = ("train", "test", "meta")
SPLITS = ("cifarfs", "fc100")
PARTS = ("train", "val", "test")


@dataclass
class CIFAR100Settings(DataSettings):
    """CIFAR-100's classes split into train, val and test."""

    split: str = "cifarfs"  # cifarfs, fc100, or a folder holding train.txt, val.txt, test.txt (fine class names)


class CIFAR100(Dataset):
    Settings = CIFAR100Settings

    def __init__(self, root: str, split: str, download: bool = False, cache_dir: str | None = None):
        self.root, self.split, self.download = Path(root).expanduser(), split, download

    def _base(self) -> Path:
        return self.root / "cifar-100-python"

    def _missing_message(self, missing: list[str], reason: str = "") -> str:
        base = self._base()
        return (
            f"CIFAR-100 not found: {reason or 'missing'} {', '.join(missing)} under {base}/. Extract "
            f"cifar-100-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html, the python version) in "
            f"{self.root}/, giving {base}/train, test and meta; point data.root at the folder that holds "
            f"cifar-100-python/, or run with data.download=true to fetch it with torchvision."
        )

    def _file(self, name: str) -> PickleFile:
        return PickleFile(
            self._base() / name, "a CIFAR-100 python file", "extract cifar-100-python.tar.gz again", "bytes"
        )

    def _pool(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """Every image [60000, 3, 32, 32], its fine label, and the fine labels' names."""
        missing = [name for name in FILES if not (self._base() / name).is_file()]
        if missing and self.download:
            from torchvision.datasets import CIFAR100 as Fetch

            try:
                Fetch(str(self.root), download=True)
            except Exception as err:  # any network or file failure: say what to place where
                raise MetalearnError(
                    self._missing_message(missing, f"the download failed ({type(err).__name__}: {err}), so fetch")
                ) from None
            missing = [name for name in FILES if not (self._base() / name).is_file()]
        if missing:
            raise MetalearnError(self._missing_message(missing))
        names = self._class_names()
        images, fine = [], []
        for name in ("train", "test"):
            data, labels = self._images_and_labels(name, len(names))
            images.append(torch.as_tensor(data).view(-1, 3, 32, 32))
            fine.append(torch.tensor(labels, dtype=torch.long))
        return torch.cat(images), torch.cat(fine), names

    def _class_names(self) -> list[str]:
        """The fine label names of meta, in label order."""
        file = self._file("meta")
        names = file.entry(file.read(), "fine_label_names")
        if not isinstance(names, list) or not names or not all(isinstance(n, (bytes, str)) for n in names):
            raise file.error(f"fine_label_names is {describe(names)}, not a list of names")
        try:
            names = [n.decode() if isinstance(n, bytes) else n for n in names]
        except UnicodeDecodeError:
            raise file.error("fine_label_names holds names that are not text") from None
        if len(set(names)) != len(names):
            raise file.error("fine_label_names names a class twice")
        return names

    def _images_and_labels(self, name: str, classes: int) -> tuple[np.ndarray, list[int]]:
        """The rows [n, 3072] (three 32x32 channel planes) of file `name` and their fine labels."""
        file = self._file(name)
        content = file.read()
        data = file.uint8_array(file.entry(content, "data"), "data", "[n, 3072]", _are_rows)
        labels = file.index_list(file.entry(content, "fine_labels"), "fine_labels", classes)
        if len(labels) != len(data):
            raise file.error(f"it holds {len(data)} images but {len(labels)} fine_labels")
        return data, labels

    def _classes(self, part: str) -> list[str]:
        if self.split in SPLITS:
            listed = resources.files("metalearn.data") / "splits" / "cifar100" / self.split / f"{part}.txt"
            text = listed.read_text()
        else:
            path = Path(self.split).expanduser() / f"{part}.txt"
            if not path.is_file():
                raise MetalearnError(
                    f"data.split={self.split}: {path} not found. Use cifarfs, fc100, or a folder with "
                    f"train.txt, val.txt and test.txt (a CIFAR-100 fine class name per line)."
                )
            return read_class_list(path)
        return [line.strip() for line in text.splitlines() if line.strip()]

    def load_split(self, part: str) -> ClassSplit:
        images, labels, names = self._pool()
        classes = self._classes(part)
        index: dict[str, int] = {name: i for i, name in enumerate(names)}
        unknown = [c for c in classes if c not in index]
        if unknown:
            raise MetalearnError(
                f"the {part} list of data.split={self.split} names unknown CIFAR-100 classes: {unknown[:5]}."
            )
        wanted = torch.tensor([index[c] for c in classes])
        keep = torch.isin(labels, wanted)
        remap = torch.full((len(names),), -1, dtype=torch.long)
        remap[wanted] = torch.arange(len(classes))  # class ids 0..C-1 in the list's order
        return ClassSplit(images[keep].contiguous(), remap[labels[keep]], f"cifar100/{self.split}/{part}", part)


def _are_rows(data: np.ndarray) -> bool:
    return data.ndim == 2 and data.shape[1] == 3 * 32 * 32
