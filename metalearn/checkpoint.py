"""Checkpoints: where a run keeps them, atomic save, safe load (weights_only)."""

import errno
import math
import shlex
from pathlib import Path

import torch

from metalearn.errors import MetalearnError
from metalearn.io import atomic_torch_save

FORMAT = "metalearn-checkpoint"
VERSION = 1


def checkpoint_name(cfg) -> str:
    """`checkpoint=best|last` of an eval or export config, as a string."""
    return cfg.checkpoint.value if hasattr(cfg.checkpoint, "value") else str(cfg.checkpoint)


def checkpoint_path(run_dir: Path, which: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def write_failure(err: Exception) -> str:
    """Why a write failed, in words: the OS error, or the gist of torch's serializer error."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.strerror or errno.errorcode.get(err.errno, str(err.errno))
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split("] ", 1)[-1][:200]  # torch: "[enforce fail at inline_container.cc:NNN] . <what>"


def non_finite(value, where: str = "") -> list:
    """Where a checkpoint payload holds NaN or infinite floating-point values."""
    if isinstance(value, torch.Tensor):
        return [where] if value.is_floating_point() and not bool(torch.isfinite(value).all()) else []
    if isinstance(value, float):
        return [] if math.isfinite(value) else [where]
    if isinstance(value, dict):
        return [w for k, v in value.items() for w in non_finite(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, (list, tuple)):
        return [w for i, v in enumerate(value) for w in non_finite(v, f"{where}[{i}]")]
    return []


def save_checkpoint(path: Path, payload: dict) -> None:
    """Atomically, and never with non-finite values (the previous file stays as it was)."""
    bad = non_finite(payload.get("algo", {}), "algo")
    if bad:
        raise MetalearnError(
            f"not writing {path}: {', '.join(bad[:3])} hold non-finite values; the previous checkpoint is kept."
        )
    try:
        atomic_torch_save({"format": FORMAT, "version": VERSION, **payload}, path)
    except (OSError, RuntimeError) as err:
        run_dir = Path(path).parent.parent
        raise MetalearnError(
            f"could not write {path} ({write_failure(err)}). The previous {Path(path).name}, if there was one, is "
            f"intact: nothing half-written replaced it. Free space on that disk (or lift the limit), then continue "
            f"with: metalearn train resume={shlex.quote(str(run_dir))}"
        ) from None


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
