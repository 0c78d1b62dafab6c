"""Files written so that a crash at any moment loses nothing."""

import hashlib
import json
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed over `path` when the block ends without an error.

    A crash at any moment leaves either the old file or the new one, never half.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with suppress(OSError):  # nothing left behind; none made where the folder is not one
            tmp.unlink(missing_ok=True)


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to `path` through atomic_path, flushed to disk before the rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        import torch  # here, not at the top: the CLI answers --help and --cfg without loading torch

        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())


def atomic_text(path: Path, text: str) -> None:
    """The same for a small text file."""
    with atomic_path(Path(path)) as tmp, open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def json_line(record: dict) -> str:
    """One line of strict JSON: a non-finite number is written as null (JSON has no NaN or Infinity)."""
    return json.dumps(_finite_or_none(record), allow_nan=False) + "\n"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
