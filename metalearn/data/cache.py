"""Where decoded datasets are cached, and a cache that is verified before it is trusted."""

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from metalearn.storage.atomic import atomic_torch_save

log = logging.getLogger(__name__)


def cache_dir(configured: str | None) -> Path:
    """data.cache_dir, else $METALEARN_CACHE, else ~/.cache/metalearn (never data.root)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("METALEARN_CACHE"):
        return Path(os.environ["METALEARN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "metalearn"


def _digest(value, hasher) -> None:
    if isinstance(value, torch.Tensor):
        hasher.update(str((value.dtype, tuple(value.shape))).encode())
        hasher.update(value.contiguous().view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    elif isinstance(value, dict):
        for key in sorted(value):
            hasher.update(str(key).encode())
            _digest(value[key], hasher)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _digest(item, hasher)
    else:
        hasher.update(repr(value).encode())


def checksum(content) -> str:
    hasher = hashlib.sha256()
    _digest(content, hasher)
    return hasher.hexdigest()


def save_cache(path: Path, content: dict) -> None:
    """The decoded dataset with a checksum of its bytes, written atomically."""
    atomic_torch_save({"content": content, "sha256": checksum(content)}, path)


def load_cache(path: Path, problem: Callable[[dict], str | None]) -> dict | None:
    """The cached content if it is intact and `problem(content)` finds nothing wrong; else None, with a warning.

    A damaged or inconsistent cache is never trained on: the caller rebuilds it from the dataset's files.
    """
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        content, recorded = saved["content"], saved["sha256"]
    except Exception:
        log.warning("the cache %s cannot be read (truncated or damaged): rebuilding it", path)
        return None
    if checksum(content) != recorded:
        log.warning("the cache %s does not match its checksum (damaged bytes): rebuilding it", path)
        return None
    wrong = _problem_of(content, problem)
    if wrong:
        log.warning("the cache %s holds the wrong content (%s): rebuilding it", path, wrong)
        return None
    return content


def _problem_of(content, problem: Callable[[dict], str | None]) -> str | None:
    """problem(content); a cache of another structure (another version wrote it) is wrong content."""
    try:
        return problem(content)
    except Exception as err:  # a check that trips over the content: it is not what this version writes
        return f"{type(err).__name__}: {err}"


def split_problem(content: dict, image_size: int | None = None, count: int | None = None) -> str | None:
    """What is wrong with a cached split {"images": uint8 [N, C, size, size], "labels": int64 [N]}, or None."""
    images, labels = content.get("images"), content.get("labels")
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        return "no uint8 images [N, C, H, W]"
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or tuple(labels.shape) != (len(images),):
        return "labels that do not match the images"
    if image_size is not None and tuple(images.shape[-2:]) != (image_size, image_size):
        return f"images of {tuple(images.shape[-2:])} pixels, not {image_size}x{image_size}"
    if count is not None and len(images) != count:
        return f"{len(images)} images, not {count}"
    if len(labels) and int(labels.min()) < 0:
        return "negative labels"
    return None
