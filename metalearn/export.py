"""`metalearn export run=<run> [checkpoint=best] [out=<file>.safetensors]` (the format: metalearn.exported)."""

import json
from pathlib import Path

from omegaconf import DictConfig

from metalearn.algorithms.base import weights_only
from metalearn.checkpoint import checkpoint_name, checkpoint_path, load_checkpoint
from metalearn.errors import MetalearnError
from metalearn.exported import FORMAT, SUFFIX, VERSION, flatten
from metalearn.io import file_sha256
from metalearn.runs import saved_overrides


def export(cfg: DictConfig) -> Path:
    """Write the run's checkpoint `cfg.checkpoint` to `cfg.out` (default: <run>/<checkpoint>.safetensors)."""
    from safetensors.torch import save_file

    run, which = Path(cfg.run), checkpoint_name(cfg)
    path = checkpoint_path(run, which)
    ckpt = load_checkpoint(path)
    state = weights_only(ckpt["algo"])
    tensors, values = flatten(state)
    metadata = {
        "format": FORMAT,
        "version": VERSION,
        "config": json.dumps(ckpt["config"]),
        "overrides": json.dumps(saved_overrides(str(run))),
        "values": json.dumps(values),
        "step": str(ckpt["step"]),
        "train_classes": str(ckpt.get("train_classes", 0)),
        "checkpoint": f"{which}.pt",
        "checkpoint_sha256": file_sha256(path),
    }
    out = Path(cfg.out) if cfg.out else run / f"{which}{SUFFIX}"
    if out.suffix != SUFFIX:
        raise MetalearnError(f"out={out} should end in {SUFFIX}.")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    print(f"exported {path} (step {ckpt['step']}, {len(tensors)} tensors) to {out}")
    return out
