"""MNIST few-shot splits: each digit is a class; meta-train and meta-test digits are disjoint.

The four IDX files are read from data.root/MNIST/raw/ (gzipped or not) without
writing there, and cached as uint8 tensors like Omniglot. Meta-train and
validation episodes draw from MNIST's training images, test episodes from its
test images, so validation and test never share an image even when they use
the same digits (the default: train on 0-4, validate and test on 5-9).
"""

import gzip
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metalearn.config.settings import SettingError, prefixed
from metalearn.data.base import Dataset, DataSettings
from metalearn.data.cache import cache_dir, load_cache, save_cache
from metalearn.data.split import ClassSplit
from metalearn.errors import MetalearnError

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC = {"images": 2051, "labels": 2049}
POOL_OF_PART = {"train": "train", "val": "train", "test": "test"}
CACHE_VERSION = 2  # 2: with a checksum


def _find(raw: Path, name: str) -> Path | None:
    for candidate in (raw / f"{name}.gz", raw / name):
        if candidate.is_file():
            return candidate
    return None


def _missing_message(raw: Path, missing, reason: str = "") -> str:
    return (
        f"MNIST not found: {reason or 'missing'} {', '.join(f'{m}.gz' for m in missing)} under {raw}/. "
        f"Place the four standard files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        f"t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz; gzipped or not) in {raw}/, "
        f"point data.root at the folder that holds MNIST/, "
        f"or run with data.download=true to fetch them with torchvision."
    )


def _read_idx(path: Path, kind: str) -> torch.Tensor:
    """An IDX file (big-endian header: magic, sizes; then uint8 data) as a tensor."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    dims = 3 if kind == "images" else 1
    header = [int.from_bytes(data[4 * i : 4 * i + 4], "big") for i in range(1 + dims)]
    size = 1
    for n in header[1:]:
        size *= n
    if header[0] != IDX_MAGIC[kind] or len(data) != 4 * (1 + dims) + size:
        raise MetalearnError(
            f"{path} is not an MNIST {kind} file (wrong magic number or size): replace it with the original."
        )
    return torch.frombuffer(bytearray(data), dtype=torch.uint8, offset=4 * (1 + dims)).view(*header[1:]).clone()


def load_pools(root: str, cache: str | None, download: bool) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """MNIST's own train and test sets: images uint8 [n, 28, 28] and labels [n]."""
    root_path = Path(root).expanduser()
    raw = root_path / "MNIST" / "raw"
    names = [name for pair in FILES.values() for name in pair]
    missing = [name for name in names if _find(raw, name) is None]
    if missing and download:
        from torchvision.datasets import MNIST

        try:
            for train in (True, False):
                MNIST(str(root_path), train=train, download=True)
        except Exception as err:  # any network or file failure: say what to place where
            raise MetalearnError(
                _missing_message(raw, missing, f"the download failed ({type(err).__name__}: {err}), so fetch")
            ) from None
        missing = [name for name in names if _find(raw, name) is None]
    if missing:
        raise MetalearnError(_missing_message(raw, missing))

    key = "-".join(str(_find(raw, name).stat().st_size) for name in names)
    cache_file = cache_dir(cache) / f"mnist-v{CACHE_VERSION}-{key}.pt"
    cached = load_cache(cache_file, _cache_problem)
    if cached is not None:
        return {pool: tuple(pair) for pool, pair in cached.items()}
    try:
        pools = {
            pool: (_read_idx(_find(raw, images), "images"), _read_idx(_find(raw, labels), "labels").long())
            for pool, (images, labels) in FILES.items()
        }
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise MetalearnError(
            f"Could not read MNIST under {raw}/ ({type(err).__name__}: {err}). "
            f"A file may be truncated: replace it with the original."
        ) from None
    for pool, (images, labels) in pools.items():
        if len(images) != len(labels):
            raise MetalearnError(f"MNIST {pool} images and labels under {raw}/ differ in count: replace them.")
    save_cache(cache_file, pools)
    return pools


def _cache_problem(content: dict) -> str | None:
    if set(content) != set(FILES):
        return f"pools {sorted(content)}, not {sorted(FILES)}"
    for pool, (images, labels) in content.items():
        if images.dtype != torch.uint8 or images.dim() != 3 or tuple(images.shape[1:]) != (28, 28):
            return f"{pool} images of shape {tuple(images.shape)}"
        if len(labels) != len(images) or (len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) <= 9):
            return f"{pool} labels that do not match the images"
    return None


@dataclass
class DigitClasses:
    """Which digits each part of the split draws from."""

    train: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])  # meta-training digits
    val: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])  # validation digits (MNIST's training images)
    test: list[int] = field(default_factory=lambda: [5, 6, 7, 8, 9])  # test digits (MNIST's test images)

    def check(self):
        """Digits 0-9, no repeats; meta-train digits never used for validation or test."""
        for part in ("train", "val", "test"):
            digits = list(getattr(self, part))
            if not digits or any(not 0 <= d <= 9 for d in digits) or len(set(digits)) != len(digits):
                raise SettingError(
                    f"classes.{part}", f"={digits} must list distinct digits from 0 to 9 (at least one)."
                )
        for part in ("val", "test"):
            shared = sorted(set(self.train) & set(getattr(self, part)))
            if shared:
                raise SettingError(
                    "train",
                    f"and data.classes.{part} share the digits {shared}: meta-test classes must never be seen in "
                    f"meta-training. (Validation and test may share digits; they draw from MNIST's training and "
                    f"test images respectively.)",
                )


@dataclass
class MNISTSettings(DataSettings):
    split: str = "digits"  # the only MNIST split: `classes` says which digits each part has
    classes: DigitClasses = field(default_factory=DigitClasses)

    def __post_init__(self):
        super().__post_init__()
        with prefixed("classes"):
            self.classes.check()
        if self.split != "digits":
            raise SettingError(
                "split",
                f"={self.split} does not apply to MNIST: its split is 'digits', with the classes of each part in "
                f"data.classes.train/val/test.",
            )


class MNIST(Dataset):
    Settings = MNISTSettings

    def __init__(self, root: str, classes: DigitClasses, split: str = "digits", download: bool = False, cache_dir=None):
        self.root, self.classes, self.download, self.cache_dir = root, classes, download, cache_dir

    def load_split(self, part: str) -> ClassSplit:
        images, labels = load_pools(self.root, self.cache_dir, self.download)[POOL_OF_PART[part]]
        digits = torch.tensor(list(getattr(self.classes, part)))
        keep = torch.isin(labels, digits)
        # Class ids 0..C-1 in the order the digits are listed.
        remap = torch.full((10,), -1, dtype=torch.long)
        remap[digits] = torch.arange(len(digits))
        return ClassSplit(
            images=images[keep].unsqueeze(1).contiguous(),  # MNIST is already ink high
            labels=remap[labels[keep]],
            name=f"mnist/{part} (digits {','.join(map(str, digits.tolist()))})",
            part=part,
        )
