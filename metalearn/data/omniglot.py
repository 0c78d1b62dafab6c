"""Omniglot: 1623 handwritten characters x 20 drawings, as uint8 tensors.

The PNGs are read from data.root/omniglot-py/ (the two archives or the same
folders extracted), resized to 28x28 and inverted so ink is high, then cached
under the project's own cache folder: decoding 32 460 PNGs takes a while, the
cache loads in well under a second.
"""

import re
import zipfile
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from metalearn.data.base import Dataset, DataSettings
from metalearn.data.cache import cache_dir, load_cache, save_cache
from metalearn.data.images import read_image
from metalearn.data.split import ClassSplit, read_class_list
from metalearn.errors import MetalearnError

ARCHIVES = ("images_background", "images_evaluation")
IMAGE_SIZE = 28
DRAWINGS = 20
SPLITS = ("vinyals", "lake")
CACHE_VERSION = 2  # 2: with a checksum


def _sources(base: Path) -> dict[str, Path]:
    """Each archive as an extracted folder if present, else as its zip."""
    found = {}
    for name in ARCHIVES:
        if (base / name).is_dir():
            found[name] = base / name
        elif (base / f"{name}.zip").is_file():
            found[name] = base / f"{name}.zip"
    return found


def _missing_message(base: Path, missing: list[str], reason: str = "") -> str:
    files = ", ".join(f"{name}.zip" for name in missing)
    return (
        f"Omniglot not found: {reason or 'missing'} {files} under {base}/. "
        f"Place the archives images_background.zip and images_evaluation.zip from "
        f"https://github.com/brendenlake/omniglot (folder python/) in {base}/ "
        f"(or extract them there, giving {base}/images_background/<Alphabet>/characterNN/*.png), "
        f"point data.root at the folder that holds omniglot-py/, "
        f"or run with data.download=true to fetch them with torchvision."
    )


def _download(root: Path, base: Path, missing: list[str]) -> None:
    from torchvision.datasets import Omniglot

    try:
        for name in missing:
            Omniglot(str(root), background=(name == "images_background"), download=True)
    except Exception as err:  # any network or file failure: say what to place where
        raise MetalearnError(
            _missing_message(base, missing, f"the download failed ({type(err).__name__}: {err}), so fetch")
        ) from None


def _png_members(source: Path) -> list[tuple[str, object]]:
    """(Alphabet/characterNN/file.png, reader) for every PNG of one archive."""
    if source.is_dir():
        paths = sorted(source.glob("*/*/*.png"))
        return [(str(p.relative_to(source)), p.read_bytes) for p in paths]
    archive = zipfile.ZipFile(source)
    names = sorted(n for n in archive.namelist() if n.endswith(".png"))
    return [("/".join(n.split("/")[-3:]), (lambda n=n: archive.read(n))) for n in names]


def _decode(data: bytes, name: str) -> torch.Tensor:
    # LANCZOS as in the MAML reference code's Omniglot preparation.
    pixels = read_image(data, name, "L", IMAGE_SIZE, Image.LANCZOS)
    return 255 - pixels.view(IMAGE_SIZE, IMAGE_SIZE)  # ink high


def _member_bytes(read, name: str) -> bytes:
    try:
        return read()
    except (zipfile.BadZipFile, EOFError, zlib.error) as err:
        raise MetalearnError(
            f"{name} cannot be read ({type(err).__name__}: {err}): the archive is damaged; replace it with a "
            f"complete copy."
        ) from None


def _decode_all(sources: dict[str, Path]) -> tuple[torch.Tensor, list[str]]:
    members = [(sources[name], *m) for name in ARCHIVES for m in _png_members(sources[name])]
    by_character: dict[str, list[torch.Tensor]] = {}
    for source, relpath, read in tqdm(members, desc="decoding Omniglot (first run only)", unit="img"):
        character = "/".join(relpath.split("/")[:2])
        name = f"{source}/{relpath}" if source.is_dir() else f"{relpath} in {source}"
        by_character.setdefault(character, []).append(_decode(_member_bytes(read, name), name))
    names = sorted(by_character)
    short = [n for n in names if len(by_character[n]) < DRAWINGS]
    if short:
        raise MetalearnError(
            f"Omniglot under {next(iter(sources.values())).parent} is incomplete: "
            f"{len(short)} characters have fewer than {DRAWINGS} drawings (e.g. {short[0]}). "
            f"Replace the archives with complete copies."
        )
    images = torch.stack([torch.stack(by_character[n][:DRAWINGS]) for n in names])
    return images, names


def _cache_key(sources: dict[str, Path]) -> str:
    """Changes when an archive is replaced by one of another size, or by a folder."""
    return "-".join(
        "dir" if path.is_dir() else str(path.stat().st_size) for path in (sources[name] for name in ARCHIVES)
    )


def load_characters(root: str, cache: str | None, download: bool) -> tuple[torch.Tensor, list[str]]:
    """All characters: images uint8 [1623, 20, 28, 28] and names 'Alphabet/characterNN'."""
    root_path = Path(root).expanduser()
    base = root_path / "omniglot-py"
    sources = _sources(base)
    missing = [name for name in ARCHIVES if name not in sources]
    if missing and download:
        _download(root_path, base, missing)
        sources = _sources(base)
        missing = [name for name in ARCHIVES if name not in sources]
    if missing:
        raise MetalearnError(_missing_message(base, missing))

    cache_file = cache_dir(cache) / f"omniglot-{IMAGE_SIZE}px-v{CACHE_VERSION}-{_cache_key(sources)}.pt"
    cached = load_cache(cache_file, _cache_problem)
    if cached is not None:
        return cached["images"], cached["names"]
    try:
        images, names = _decode_all(sources)
    except (zipfile.BadZipFile, OSError) as err:
        raise MetalearnError(
            f"Could not read Omniglot under {base}/ ({type(err).__name__}: {err}). "
            f"The archives may be truncated: replace them with complete copies."
        ) from None
    save_cache(cache_file, {"images": images, "names": names})
    return images, names


def _cache_problem(content: dict) -> str | None:
    images, names = content.get("images"), content.get("names")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        return "no uint8 images"
    if images.dim() != 4 or tuple(images.shape[1:]) != (DRAWINGS, IMAGE_SIZE, IMAGE_SIZE):
        return f"images of shape {tuple(images.shape)}, not [characters, {DRAWINGS}, {IMAGE_SIZE}, {IMAGE_SIZE}]"
    if not isinstance(names, list) or len(names) != len(images) or len(set(names)) != len(names):
        return "character names that do not match the images"
    return None


def split_classes(split: str, part: str) -> list[str]:
    """Class names 'Alphabet/characterNN/rotDDD' of one part of a split.

    `split` is a shipped split (vinyals, lake) or a folder of one's own holding
    train.txt, val.txt and test.txt in the same format.
    """
    if split in SPLITS:
        text = resources.files("metalearn.data").joinpath(f"splits/omniglot/{split}/{part}.txt").read_text()
        return [line.strip() for line in text.splitlines() if line.strip()]
    path = Path(split).expanduser() / f"{part}.txt"
    if not path.is_file():
        raise MetalearnError(
            f"data.split={split} is neither an Omniglot split ({', '.join(SPLITS)}) nor a folder holding "
            f"train.txt, val.txt and test.txt (no {part}.txt there)."
        )
    classes = read_class_list(path)
    wrong = [c for c in classes if not CLASS_NAME.fullmatch(c)]
    if wrong:
        raise MetalearnError(
            f"{path} lists {wrong[0][:80]!r}, not a class Alphabet/characterNN/rotDDD (rotation rot000, rot090, "
            f"rot180 or rot270), e.g. Latin/character01/rot090."
        )
    return classes


CLASS_NAME = re.compile(r"[^/]+/[^/]+/rot(000|090|180|270)")


@dataclass
class OmniglotSettings(DataSettings):
    # vinyals: 1028/172/423 characters x 4 rotations (Vinyals et al. 2016); lake: background alphabets for
    # train/val, evaluation alphabets for test, no rotations; or a folder with train.txt, val.txt, test.txt.
    split: str = "vinyals"


class Omniglot(Dataset):
    Settings = OmniglotSettings

    def __init__(self, root: str, split: str, download: bool = False, cache_dir: str | None = None):
        self.root, self.split, self.download, self.cache_dir = root, split, download, cache_dir

    def load_split(self, part: str) -> ClassSplit:
        """One part (train, val or test) of an Omniglot split, rotations applied."""
        images, names = load_characters(self.root, self.cache_dir, self.download)
        index = {name: i for i, name in enumerate(names)}
        classes = split_classes(self.split, part)
        characters, quarter_turns = [], []
        for cls in classes:
            character, rotation = cls.rsplit("/", 1)
            if character not in index:
                raise MetalearnError(f"Split {self.split}/{part} names {character}, which the Omniglot data lacks.")
            characters.append(index[character])
            quarter_turns.append(int(rotation[3:]) // 90)
        selected = images[torch.tensor(characters)]  # [C, 20, 28, 28]
        turns = torch.tensor(quarter_turns)
        for k in range(1, 4):  # rotate each class by its own multiple of 90 degrees
            mask = turns == k
            if mask.any():
                selected[mask] = torch.rot90(selected[mask], k, dims=(-2, -1))
        num_classes = len(classes)
        return ClassSplit(
            images=selected.reshape(num_classes * DRAWINGS, 1, IMAGE_SIZE, IMAGE_SIZE).contiguous(),
            labels=torch.arange(num_classes).repeat_interleave(DRAWINGS),
            name=f"omniglot/{self.split}/{part}",
            part=part,
        )
