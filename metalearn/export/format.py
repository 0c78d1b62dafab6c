"""The file `metalearn export` writes: a run's weights as safetensors, its config as metadata.

A safetensors file holds named tensors and string metadata, nothing that
runs code when loaded, so a model can be shared without pickles. The file
keeps what evaluation needs (the algorithm's state without its optimizer and
scheduler, TRAINING_STATE) and what identifies it (the run's config and
overrides, the step, the checkpoint's sha256); `metalearn eval
run=<file>.safetensors` scores it like a run.
"""

import json
import re
import sys
from pathlib import Path

from metalearn.config.migrate import new_key
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


def unflatten(items, source: Path) -> dict:
    """The nested state of `flatten`'s (path, tensor or value) pairs; a path given twice, or under another's
    value, is an error about `source`."""
    nested = {}
    for path, value in items:
        *parents, leaf = path.split(SEPARATOR)
        node = nested
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise MetalearnError(f"{source} is a damaged metalearn export: its state holds {path!r} under a value.")
        if leaf in node:
            raise MetalearnError(f"{source} is a damaged metalearn export: its state holds {path!r} twice.")
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
        raise MetalearnError(f"{path} is export version {metadata.get('version')!r}; this metalearn reads {VERSION}.")
    return metadata


# The metadata entries `metalearn export` writes as JSON, and what each must parse to.
JSON_ENTRIES = {"config": dict, "overrides": list, "values": dict}
COUNT_ENTRIES = ("step", "train_classes")  # non-negative integers, in decimal


def damaged(path: Path, what: str) -> MetalearnError:
    return MetalearnError(
        f"{path} is a damaged metalearn export: {what}. Export the run again (metalearn export run=<run folder>) "
        f"or ask whoever shared it for a new copy."
    )


def checked_metadata(path: Path) -> dict:
    """The export's metadata with every entry present and of its type: JSON entries parsed, counts as ints."""
    metadata = read_metadata(path)
    missing = [key for key in (*JSON_ENTRIES, *COUNT_ENTRIES) if key not in metadata]
    if missing:
        raise damaged(path, f"its metadata has no {', '.join(missing)}")
    parsed = {}
    for key, kind in JSON_ENTRIES.items():
        try:
            parsed[key] = json.loads(metadata[key])
        except (ValueError, RecursionError):
            raise damaged(path, f"its metadata entry {key!r} is not JSON") from None
        if not isinstance(parsed[key], kind):
            raise damaged(path, f"its metadata entry {key!r} is not a JSON {'object' if kind is dict else 'list'}")
    for key in COUNT_ENTRIES:
        if not re.fullmatch(r"[0-9]{1,18}", metadata[key]):
            raise damaged(path, f"its metadata entry {key!r} is {metadata[key][:40]!r}, not a count")
        parsed[key] = int(metadata[key])
    if not all(isinstance(o, str) for o in parsed["overrides"]):
        raise damaged(path, "its metadata entry 'overrides' is not a list of strings")
    return parsed


# What a downloaded file may set on the recipient's machine: the model and the tasks it was trained on,
# never where files are read or written, what runs (hooks, loggers, any `_target_`), or the device.
CHOSEN_GROUPS = ("algo", "data", "model", "experiment")  # a built-in YAML of metalearn.conf, by name
MODEL_PREFIXES = ("algo.", "model.", "task.")
TASK_DATA_KEYS = (
    "data.name",
    "data.split",
    "data.classes",
    "data.fractions",
    "data.split_seed",
    "data.image_size",
    "data.channels",
    "data.invert",
    "data.mean",
    "data.std",
    "data.augment",
    "data.crop_padding",
)
_KEY = re.compile(r"[+~]*(?P<key>[A-Za-z_][\w.]*)(=(?P<value>.*))?", re.S)
_CONFIG_NAME = re.compile(r"[\w-]+")


def model_override(override: str) -> bool:
    """An override that describes the model or its tasks, nothing of the machine it runs on."""
    match = _KEY.fullmatch(override)
    if match is None:
        return False
    key, value = new_key(match.group("key"), "") or match.group("key"), match.group("value") or ""
    if "_target_" in key or "_target_" in value or "${" in value:  # code to build; interpolations to resolve
        return False
    if key in CHOSEN_GROUPS:
        return bool(_CONFIG_NAME.fullmatch(value))
    return key.startswith(MODEL_PREFIXES) or key in ("seed", *TASK_DATA_KEYS) or key.startswith("data.classes.")


def shown_key(override: str) -> str:
    """An override's key as a note shows it: a file's odd text escaped, never printed raw to a terminal."""
    match = _KEY.fullmatch(override)
    return match.group("key") if match else ascii(override[:40])


def exported_overrides(path: Path) -> list[str]:
    """The overrides of the run a file was exported from (to compose its config again), those that describe
    its model and tasks only: a shared file does not choose paths, code or the device here (a note lists the
    others)."""
    overrides = checked_metadata(path)["overrides"]
    kept = [o for o in overrides if model_override(o)]
    ignored = [shown_key(o) for o in overrides if not model_override(o)]
    if ignored:
        print(
            f"metalearn: note: of the overrides saved in {path}, only those of the model and its tasks apply; "
            f"ignored: {', '.join(dict.fromkeys(ignored))}. Give what this machine needs (e.g. data.root=<folder>) "
            f"on the command line.",
            file=sys.stderr,
        )
    return kept


def load_export(path: Path) -> dict:
    """An exported file as a checkpoint-like dict: {"algo": state without optimizer, "step", "train_classes", ...}.

    The config it keeps is information only: nothing is built, and no path chosen, from it.
    """
    import torch
    from safetensors.torch import load_file

    metadata = checked_metadata(path)
    tensors = load_file(str(path))  # read_metadata opened it: its header and sizes are sound
    algo = unflatten([*tensors.items(), *metadata["values"].items()], path)
    weights = algo.get("model")
    if not isinstance(weights, dict) or not weights or not all(torch.is_tensor(w) for w in weights.values()):
        raise damaged(path, "its model weights (model/<parameter>) are missing or not all tensors")
    return {
        "algo": algo,
        "step": metadata["step"],
        "train_classes": metadata["train_classes"],
        "config": metadata["config"],
    }


def is_export(run) -> bool:
    return str(run).endswith(SUFFIX)


def record_folder(run) -> Path:
    """Where an evaluation of `run` is logged and recorded: the run folder, or the folder of an exported file."""
    return Path(run).parent if is_export(run) else Path(run)
