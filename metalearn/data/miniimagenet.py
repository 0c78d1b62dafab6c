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
from typing import Dict, List, Optional

import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from metalearn.data.base import Dataset, DataSettings
from metalearn.data.cache import cache_dir, load_cache, save_cache
from metalearn.data.pickles import PICKLE_ERRORS, load_arrays
from metalearn.data.split import ClassSplit
from metalearn.errors import MetalearnError
from metalearn.settings import at_least

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

    def __init__(self, root: str, image_size: int, download: bool = False, cache_dir: Optional[str] = None):
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

        def problem(content):
            return None if content["images"].shape[-1] == self.image_size else "another image size"

        content = load_cache(path, problem)
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

    def _from_images(self, csv_file: Path, part: str) -> Dict[str, torch.Tensor]:
        with open(csv_file, newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
        if rows and rows[0][:2] == ["filename", "label"]:
            rows = rows[1:]
        classes: Dict[str, int] = {}
        images, labels = [], []
        for filename, label, *_ in tqdm(rows, desc=f"reading miniImageNet {part}", unit="img"):
            path = self.base / "images" / filename
            try:
                with Image.open(path) as image:
                    images.append(self._resized(image))
            except FileNotFoundError:
                raise MetalearnError(f"{csv_file} lists {filename}, which is not in {self.base / 'images'}/.") from None
            except (UnidentifiedImageError, OSError) as err:
                raise MetalearnError(f"{path} is not a readable image ({err}): replace it.") from None
            labels.append(classes.setdefault(label, len(classes)))
        if not images:
            raise MetalearnError(f"{csv_file} lists no images (expected lines of filename,label).")
        return {"images": torch.stack(images), "labels": torch.tensor(labels, dtype=torch.long)}

    def _from_pickle(self, pickle_file: Path, part: str) -> Dict[str, torch.Tensor]:
        try:
            content = load_arrays(pickle_file.read_bytes())
            data = torch.as_tensor(content["image_data"])
            class_dict = content["class_dict"]
        except PICKLE_ERRORS as err:
            raise MetalearnError(
                f"{pickle_file} is not a miniImageNet pickle ({type(err).__name__}: {err}): it should hold "
                f"image_data (uint8 [N, 84, 84, 3]) and class_dict (class -> row indices)."
            ) from None
        if data.dtype != torch.uint8 or data.dim() != 4 or data.shape[-1] != 3:
            raise MetalearnError(
                f"{pickle_file}: image_data is {tuple(data.shape)} {data.dtype}, not uint8 [N, H, W, 3]."
            )
        rows: List[int] = []
        labels: List[int] = []
        for label, name in enumerate(sorted(class_dict)):
            indices = [int(i) for i in class_dict[name]]
            rows += indices
            labels += [label] * len(indices)
        images = data[torch.tensor(rows)].permute(0, 3, 1, 2)
        if images.shape[-1] != self.image_size:
            images = torch.stack([self._resized(Image.fromarray(i.permute(1, 2, 0).numpy())) for i in images])
        return {"images": images.contiguous(), "labels": torch.tensor(labels, dtype=torch.long)}
