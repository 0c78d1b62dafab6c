"""Checkpoints: where a run keeps them, atomic save, safe load (weights_only)."""

from pathlib import Path

import torch

from metalearn.errors import MetalearnError
from metalearn.io import atomic_torch_save

FORMAT = "metalearn-checkpoint"
VERSION = 1


def checkpoint_path(run_dir: Path, which: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def save_checkpoint(path: Path, payload: dict) -> None:
    atomic_torch_save({"format": FORMAT, "version": VERSION, **payload}, path)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint without running code from it; any damage is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise MetalearnError(f"No checkpoint at {path}.")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MetalearnError(
            f"{path} cannot be read as a checkpoint ({reason[:200]}). It is truncated, corrupt, or not a "
            f"metalearn checkpoint; use the other checkpoint of the run (checkpoint=best or checkpoint=last)."
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise MetalearnError(f"{path} is not a metalearn checkpoint.")
    if payload.get("version") != VERSION:
        raise MetalearnError(
            f"{path} has checkpoint format version {payload.get('version')}; this metalearn reads version {VERSION}."
        )
    return payload
