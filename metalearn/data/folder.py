"""Your own images as a few-shot dataset: one folder per class.

    <data.root>/<class name>/*.png|jpg|jpeg|bmp|gif|webp

The classes are split between train, val and test by three lists of class
names, one per line (`train.txt`, `val.txt`, `test.txt` in data.split, or in
data.root when data.split is null and they are there), or else by class
fractions with a seeded shuffle. Images are read once with PIL, converted to
data.channels (1: grey, 3: RGB), resized to data.image_size square and cached
as uint8 tensors, like Omniglot.
"""

import hashlib
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from metalearn.config.settings import SettingError, at_least
from metalearn.data.base import Dataset, DataSettings
from metalearn.data.cache import cache_dir, load_cache, save_cache, split_problem
from metalearn.data.images import read_image
from metalearn.data.split import ClassSplit, read_class_list
from metalearn.errors import MetalearnError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
PARTS = ("train", "val", "test")
CACHE_VERSION = 1


@dataclass
class FolderSettings(DataSettings):
    """A folder of class folders; the split by lists of class names or by fractions."""

    # The folder holding train.txt, val.txt and test.txt (a class name per line); null: data.root if they are
    # there, else the classes are split by data.fractions.
    split: str | None = None
    fractions: list[float] = field(default_factory=lambda: [0.64, 0.16, 0.2])  # train, val, test shares of classes
    split_seed: int = 0  # the shuffle of the classes before they are split by data.fractions
    image_size: int = 28  # images are resized to image_size x image_size
    channels: int = 1  # 1: grey, 3: RGB
    invert: bool = False  # true: dark ink on a light ground becomes high values, as Omniglot and MNIST have it

    def __post_init__(self):
        super().__post_init__()
        at_least(self, "image_size", 4)
        if self.channels not in (1, 3):
            raise SettingError("channels", f"must be 1 (grey) or 3 (RGB) (got {self.channels}).")
        if len(self.fractions) != 3 or min(self.fractions) < 0 or abs(sum(self.fractions) - 1) > 1e-6:
            raise SettingError(
                "fractions", f"must be three shares [train, val, test] summing to 1 (got {self.fractions})."
            )


class ImageFolder(Dataset):
    Settings = FolderSettings

    def __init__(
        self,
        root: str,
        download: bool,
        cache_dir: str | None,
        split: str | None,
        fractions: list[float],
        split_seed: int,
        image_size: int,
        channels: int,
        invert: bool,
    ):
        if download:
            raise MetalearnError(
                "data=folder reads your own images: there is nothing to download (data.download=false)."
            )
        self.root, self.cache = Path(root).expanduser(), cache_dir
        self.split, self.fractions, self.split_seed = split, list(fractions), split_seed
        self.image_size, self.channels, self.invert = image_size, channels, invert

    # --- the classes and their split ---------------------------------------------
    def classes(self) -> dict[str, list[Path]]:
        """Each class folder's images, sorted; classes without images are left out."""
        if not self.root.is_dir():
            raise MetalearnError(
                f"data.root={self.root} is not a folder. data=folder reads <data.root>/<class>/*.png (or .jpg): "
                f"point data.root at the folder that holds one folder per class."
            )
        found = {}
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS)
            if images:
                found[folder.name] = images
        if len(found) < 3:
            raise MetalearnError(
                f"{self.root} holds {len(found)} class folder(s) with images; data=folder needs at least 3 "
                f"(train, val and test classes), as <data.root>/<class>/*.png or *.jpg."
            )
        return found

    def split_lists(self, names: list[str]) -> dict[str, list[str]]:
        """The class names of each part: from the list files, or by data.fractions."""
        folder = Path(self.split).expanduser() if self.split else self.root
        lists = {part: folder / f"{part}.txt" for part in PARTS}
        present = [part for part, path in lists.items() if path.is_file()]
        if present and len(present) < 3:
            missing = ", ".join(str(lists[p]) for p in PARTS if p not in present)
            raise MetalearnError(f"{missing} missing: give all three split lists (a class per line), or none.")
        if not present:
            if self.split:
                raise MetalearnError(
                    f"data.split={folder} holds no train.txt, val.txt and test.txt (a class per line)."
                )
            return self._by_fractions(names)
        parts = {p: read_class_list(lists[p]) for p in PARTS}
        known = set(names)
        for part, listed in parts.items():
            unknown = [c for c in listed if c not in known]
            if unknown:
                raise MetalearnError(
                    f"{lists[part]} names classes that have no image folder under {self.root}: "
                    f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}."
                )
        shared = (set(parts["train"]) & (set(parts["val"]) | set(parts["test"]))) | (
            set(parts["val"]) & set(parts["test"])
        )
        if shared:
            raise MetalearnError(
                f"the split lists share classes ({', '.join(sorted(shared)[:5])}): each class in one list."
            )
        return parts

    def _by_fractions(self, names: list[str]) -> dict[str, list[str]]:
        """A seeded shuffle of the classes cut by data.fractions, each part keeping at least one class."""
        shuffled = list(names)
        random.Random(self.split_seed).shuffle(shuffled)
        n = len(shuffled)
        train = min(max(1, round(self.fractions[0] * n)), n - 2)
        val = min(max(1, round(self.fractions[1] * n)), n - train - 1)
        parts = {"train": shuffled[:train], "val": shuffled[train : train + val], "test": shuffled[train + val :]}
        return {part: sorted(classes) for part, classes in parts.items()}

    # --- images --------------------------------------------------------------------
    def _read(self, path: Path) -> torch.Tensor:
        data = read_image(path, str(path), "L" if self.channels == 1 else "RGB", self.image_size, Image.BILINEAR)
        return 255 - data if self.invert else data

    def load_split(self, part: str) -> ClassSplit:
        classes = self.classes()
        names = self.split_lists(sorted(classes))[part]
        files = [(name, path) for name in names for path in classes[name]]
        fingerprint = hashlib.sha256(
            repr(
                [
                    CACHE_VERSION,
                    str(self.root.resolve()),
                    self.image_size,
                    self.channels,
                    self.invert,
                    [(n, p.name, p.stat().st_size, p.stat().st_mtime_ns) for n, p in files],
                ]
            ).encode()
        ).hexdigest()[:16]
        path = cache_dir(self.cache) / f"folder-{fingerprint}.pt"
        content = load_cache(path, lambda content: split_problem(content, self.image_size, count=len(files)))
        if content is None:
            index = {name: i for i, name in enumerate(names)}
            images = [self._read(p) for _, p in tqdm(files, desc=f"reading {self.root.name}/{part}", unit="img")]
            content = {
                "images": torch.stack(images),
                "labels": torch.tensor([index[n] for n, _ in files], dtype=torch.long),
            }
            path.parent.mkdir(parents=True, exist_ok=True)
            save_cache(path, content)
        return ClassSplit(content["images"], content["labels"], f"folder {self.root.name}/{part}", part)
