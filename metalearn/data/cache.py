"""Where decoded datasets are cached, and how a cache file is written safely."""

import os
from pathlib import Path
from typing import Optional

import torch


def cache_dir(configured: Optional[str]) -> Path:
    """data.cache_dir, else $METALEARN_CACHE, else ~/.cache/metalearn (never data.root)."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get("METALEARN_CACHE"):
        return Path(os.environ["METALEARN_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "metalearn"


def atomic_torch_save(obj, path: Path) -> None:
    """Write to a temporary file, flush it to disk, then rename over `path`.

    A crash at any moment leaves either the old file or the new one, never half.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
