"""Files written so that a crash at any moment loses nothing."""

import os
from pathlib import Path

import torch


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
