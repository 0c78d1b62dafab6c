"""The file `metalearn export` writes: a run's weights as safetensors, its config as metadata.

A safetensors file holds named tensors and string metadata, nothing that
runs code when loaded, so a model can be shared without pickles. The file
keeps what evaluation needs (the algorithm's state without its optimizer and
scheduler, TRAINING_STATE) and what identifies it (the run's config and
overrides, the step, the checkpoint's sha256); `metalearn eval
run=<file>.safetensors` scores it like a run.
"""

import json
from pathlib import Path

from metalearn.errors import MetalearnError

FORMAT = "metalearn-export"
VERSION = "1"
SUFFIX = ".safetensors"
SEPARATOR = "/"  # nested state keys, e.g. "model/features.0.0.weight"


def flatten(state: dict, prefix: str = ""):
    """Tensors by their path in the nested state dict, and the plain values beside them (steps, counts)."""
    import torch  # here, not at the top: the CLI answers --help and --cfg without loading torch

    tensors, values = {}, {}
    for key, value in state.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            more_tensors, more_values = flatten(value, path + SEPARATOR)
            tensors.update(more_tensors)
            values.update(more_values)
        elif isinstance(value, torch.Tensor):
            tensors[path] = value.detach().contiguous().cpu()
        else:
            values[path] = value
    return tensors, values


def unflatten(flat: dict) -> dict:
    nested = {}
    for path, value in flat.items():
        *parents, leaf = path.split(SEPARATOR)
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return nested


def read_metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MetalearnError(f"{path} cannot be read as a safetensors file ({reason[:200]}).") from None
    if metadata.get("format") != FORMAT:
        raise MetalearnError(f"{path} is a safetensors file but not a metalearn export (no '{FORMAT}' metadata).")
    if metadata.get("version") != VERSION:
        raise MetalearnError(f"{path} is export version {metadata.get('version')}; this metalearn reads {VERSION}.")
    return metadata


def exported_overrides(path: Path) -> list:
    """The overrides of the run a file was exported from (to compose its config again)."""
    return list(json.loads(read_metadata(path)["overrides"]))


def load_export(path: Path) -> dict:
    """An exported file as a checkpoint-like dict: {"algo": state without optimizer, "step", "train_classes", ...}."""
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    flat = {**load_file(str(path)), **json.loads(metadata["values"])}
    return {
        "algo": unflatten(flat),
        "step": int(metadata["step"]),
        "train_classes": int(metadata["train_classes"]),
        "config": json.loads(metadata["config"]),
    }


def is_export(run) -> bool:
    return str(run).endswith(SUFFIX)


def record_folder(run) -> Path:
    """Where an evaluation of `run` is logged and recorded: the run folder, or the folder of an exported file."""
    return Path(run).parent if is_export(run) else Path(run)
