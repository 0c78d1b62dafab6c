"""miniImageNet (Vinyals et al. 2016) with the class split of Ravi & Larochelle (2017): 64 / 16 / 20
classes of 600 images, 84x84 RGB.

It cannot be downloaded automatically (ImageNet's licence), so it is read from
one of the two layouts people have, under `<data.root>/miniimagenet/`:

    images/*.jpg + train.csv, val.csv, test.csv   the Ravi & Larochelle CSVs (filename,label), any image size
    mini-imagenet-cache-{train,val,test}.pkl      the widely shared pickles: {"image_data": uint8 [N, 84, 84, 3],
                                                  "class_dict": {class: [row indices]}}

Images are resized to data.image_size (84) once and cached as uint8 tensors;
the pickles are read with metalearn.data.pickles (arrays and plain
containers only).
"""

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from metalearn.config.settings import at_least
from metalearn.data.base import Dataset, DataSettings
from metalearn.data.cache import cache_dir, load_cache, save_cache, split_problem
from metalearn.data.images import read_image
from metalearn.data.pickles import PickleFile, describe
from metalearn.data.split import ClassSplit
from metalearn.errors import MetalearnError

PARTS = ("train", "val", "test")
CACHE_VERSION = 1


@dataclass
class MiniImageNetSettings(DataSettings):
    """miniImageNet from its images and CSVs, or from the per-part pickles."""

    image_size: int = 84  # the side images are resized to

    def __post_init__(self):
        super().__post_init__()
        at_least(self, "image_size", 4)


class MiniImageNet(Dataset):
    Settings = MiniImageNetSettings

    def __init__(self, root: str, image_size: int, download: bool = False, cache_dir: str | None = None):
        if download:
            raise MetalearnError(
                "miniImageNet cannot be downloaded automatically (ImageNet's terms): set data.download=false and "
                "place its files as the error without it describes."
            )
        self.base = Path(root).expanduser() / "miniimagenet"
        self.image_size, self.cache = image_size, cache_dir

    def _missing_message(self) -> str:
        return (
            f"miniImageNet not found under {self.base}/. Place either the images and the Ravi & Larochelle "
            f"split files ({self.base}/images/*.jpg with {self.base}/train.csv, val.csv, test.csv: "
            f"filename,label) or the per-part pickles ({self.base}/mini-imagenet-cache-train.pkl, -val.pkl, "
            f"-test.pkl), and point data.root at the folder that holds miniimagenet/. It cannot be downloaded "
            f"automatically."
        )

    def load_split(self, part: str) -> ClassSplit:
        csv_file, pickle_file = self.base / f"{part}.csv", self.base / f"mini-imagenet-cache-{part}.pkl"
        if csv_file.is_file() and (self.base / "images").is_dir():
            source, read = csv_file, self._from_images
        elif pickle_file.is_file():
            source, read = pickle_file, self._from_pickle
        else:
            raise MetalearnError(self._missing_message())
        stat = source.stat()
        key = repr([CACHE_VERSION, str(source.resolve()), stat.st_size, stat.st_mtime_ns, self.image_size])
        path = cache_dir(self.cache) / f"miniimagenet-{part}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"

        content = load_cache(path, lambda content: split_problem(content, self.image_size))
        if content is None:
            content = read(source, part)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_cache(path, content)
        return ClassSplit(content["images"], content["labels"], f"miniimagenet/{part}", part)

    def _resized(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        if image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        return data.view(self.image_size, self.image_size, 3).permute(2, 0, 1).contiguous()

    def _from_images(self, csv_file: Path, part: str) -> dict[str, torch.Tensor]:
        classes: dict[str, int] = {}
        images, labels = [], []
        for filename, label in tqdm(read_csv(csv_file), desc=f"reading miniImageNet {part}", unit="img"):
            path = self.base / "images" / filename
            if not path.is_file():
                raise MetalearnError(f"{csv_file} lists {filename}, which is not in {self.base / 'images'}/.")
            images.append(read_image(path, str(path), "RGB", self.image_size, Image.BILINEAR))
            labels.append(classes.setdefault(label, len(classes)))
        return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long)}

    def _from_pickle(self, pickle_file: Path, part: str) -> dict[str, torch.Tensor]:
        file = PickleFile(pickle_file, PICKLE_FORMAT, "replace it with a complete copy")
        content = file.read()
        data = file.uint8_array(file.entry(content, "image_data"), "image_data", "[N, H, W, 3]", _are_images)
        class_dict = file.entry(content, "class_dict")
        if not isinstance(class_dict, dict) or not class_dict:
            raise file.error(f"class_dict is {describe(class_dict)}, not a dict of class names to row indices")
        unnamed = [c for c in class_dict if not isinstance(c, str)]
        if unnamed:
            raise file.error(f"class_dict has the class name {unnamed[0]!r}, not a string")
        rows: list[int] = []
        labels: list[int] = []
        for label, name in enumerate(sorted(class_dict)):
            indices = file.index_list(class_dict[name], f"class_dict[{name!r}]", len(data))
            if not indices:
                raise file.error(f"class_dict[{name!r}] lists no rows of image_data")
            rows += indices
            labels += [label] * len(indices)
        images = torch.as_tensor(data)[torch.tensor(rows)].permute(0, 3, 1, 2)
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = torch.stack([self._resized(Image.fromarray(i.permute(1, 2, 0).numpy())) for i in images])
        return {"images": images.contiguous(), "labels": torch.tensor(labels, dtype=torch.long)}


PICKLE_FORMAT = (
    "a miniImageNet pickle (a dict of image_data, uint8 [N, 84, 84, 3], and class_dict: class -> row indices)"
)


def _are_images(data) -> bool:
    return data.ndim == 4 and data.shape[-1] == 3 and min(data.shape) > 0


def read_csv(csv_file: Path) -> list[tuple[str, str]]:
    """The (filename, label) rows of a Ravi & Larochelle split file, after its header filename,label."""
    try:
        with open(csv_file, newline="", encoding="utf-8") as handle:
            rows = [(number, row) for number, row in enumerate(csv.reader(handle), 1) if row]
    except (csv.Error, UnicodeDecodeError) as err:
        raise MetalearnError(f"{csv_file} is not a CSV file of filename,label lines ({err}).") from None
    if not rows or [field.strip() for field in rows[0][1][:2]] != ["filename", "label"]:
        raise MetalearnError(
            f"{csv_file} does not start with the header line filename,label: a Ravi & Larochelle split file is "
            f"that header, then a line filename,label per image (e.g. n0153282900000005.jpg,n01532829)."
        )
    found = []
    for number, row in rows[1:]:
        fields = [field.strip() for field in row]
        if len(fields) < 2 or not all(fields[:2]):
            raise MetalearnError(f"{csv_file}, row {number}: {','.join(row)[:80]!r} is not filename,label.")
        found.append((fields[0], fields[1]))
    if not found:
        raise MetalearnError(f"{csv_file} lists no images (expected lines of filename,label after its header).")
    return found
