"""`metalearn export run=<run> [checkpoint=best] [out=<file>.safetensors|<folder>]`; the format: export.format."""

import json
import os
from pathlib import Path

from omegaconf import DictConfig

from metalearn.errors import MetalearnError
from metalearn.export.format import FORMAT, SUFFIX, VERSION, flatten
from metalearn.storage.atomic import atomic_path, file_sha256
from metalearn.storage.checkpoint import checkpoint_name, checkpoint_path, load_checkpoint, weights_only
from metalearn.storage.run_folder import saved_overrides


def export(cfg: DictConfig) -> Path:
    """Write the run's checkpoint `cfg.checkpoint` to `cfg.out` (default: <run>/<checkpoint>.safetensors)."""
    run, which = Path(cfg.run), checkpoint_name(cfg)
    path = checkpoint_path(run, which)
    out = out_file(cfg.out, run, which)
    ckpt = load_checkpoint(path)
    state = weights_only(ckpt["algo"])
    tensors, values = flatten(state)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "config": as_json(ckpt["config"], path, "config"),
        "overrides": json.dumps(saved_overrides(str(run))),
        "values": as_json(values, path, "algorithm state"),
        "step": str(ckpt["step"]),
        "train_classes": str(ckpt.get("train_classes", 0)),
        "checkpoint": f"{which}.pt",
        "checkpoint_sha256": file_sha256(path),
    }
    write_export(tensors, metadata, out)
    print(f"exported {path} (step {ckpt['step']}, {len(tensors)} tensors) to {out}")
    return out


def out_file(out, run: Path, which: str) -> Path:
    """Where the export goes: `out`, or <out>/<checkpoint>.safetensors when `out` is a folder (one that
    exists, or a path ending in /), or <run>/<checkpoint>.safetensors without `out`."""
    if not out:
        return run / f"{which}{SUFFIX}"
    if Path(out).is_dir() or str(out).endswith(("/", os.sep)):
        return Path(out) / f"{which}{SUFFIX}"
    if Path(out).suffix != SUFFIX:
        raise MetalearnError(f"out={out} should end in {SUFFIX} (or name a folder to write {which}{SUFFIX} in).")
    return Path(out)


def as_json(value, path: Path, what: str) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError) as err:
        raise MetalearnError(f"{path} cannot be exported: its {what} holds what JSON cannot keep ({err}).") from None


def write_export(tensors: dict, metadata: dict, out: Path) -> None:
    """Atomically: a file already at `out` stays whole until the new one is complete."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
    except (OSError, SafetensorError) as err:  # safetensors reports its I/O errors as its own
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip() or type(err).__name__
        raise MetalearnError(
            f"could not write {out} ({reason[:200]}). Nothing was exported; choose a writable place with "
            f"out=<folder or file{SUFFIX}>."
        ) from None
