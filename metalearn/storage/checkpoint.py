"""Checkpoints: where a run keeps them, atomic save, safe load (weights_only).

checkpoints/last.pt is where training goes on from; checkpoints/best.pt holds the weights of the
best validation accuracy; with train.keep_best=N the 2nd..Nth best are checkpoints/next_best/step-<step>.pt
(`metalearn eval checkpoint=topN` scores the ensemble of best.pt and those).
"""

import errno
import math
import os
import re
import shlex
import shutil
from pathlib import Path

from metalearn.errors import MetalearnError
from metalearn.storage.atomic import atomic_torch_save

# Parts of an algorithm's state_dict needed only to go on training; `metalearn export` leaves them out,
# and load_state_dict skips them when they are absent.
TRAINING_STATE = ("optimizer", "scheduler")


def weights_only(state: dict) -> dict:
    """A checkpoint's algorithm state without what only training needs: what evaluation and export load."""
    return {k: v for k, v in state.items() if k not in TRAINING_STATE}


FORMAT = "metalearn-checkpoint"
VERSION = 1


def checkpoint_name(cfg) -> str:
    """`checkpoint=best|last` (eval: also topN) of an eval or export config, as a string."""
    return cfg.checkpoint.value if hasattr(cfg.checkpoint, "value") else str(cfg.checkpoint)


def checkpoint_path(run_dir: Path, which: str) -> Path:
    return Path(run_dir) / "checkpoints" / f"{which}.pt"


def run_of(path: Path) -> Path:
    """The run folder of a file under its checkpoints/ folder."""
    return next((p.parent for p in Path(path).parents if p.name == "checkpoints"), Path(path).parent.parent)


NEXT_BEST = "next_best"  # checkpoints/next_best/: the 2nd..Nth best validation checkpoints (train.keep_best=N)
_TOP = re.compile(r"top([1-9][0-9]*)")


def next_best_name(step: int) -> str:
    """`which` (for checkpoint_path) of the kept validation checkpoint of `step` that is not the best."""
    return f"{NEXT_BEST}/step-{step}"


def next_best_files(run_dir: Path) -> dict[int, Path]:
    """step -> checkpoints/next_best/step-<step>.pt, for the files there."""
    found = {}
    for path in (Path(run_dir) / "checkpoints" / NEXT_BEST).glob("step-*.pt"):
        digits = path.stem[len("step-") :]
        if digits.isdigit():
            found[int(digits)] = path
    return found


def top_count(name: str) -> int | None:
    """N of `checkpoint=topN`; None for best and last; any other name is an error that lists the choices."""
    if name in ("best", "last"):
        return None
    match = _TOP.fullmatch(name)
    if match is None:
        raise MetalearnError(
            f"checkpoint={name} names no checkpoint of a run: choose best, last, or topN (e.g. top5: the ensemble "
            f"of the run's 5 best validation checkpoints, kept by training with train.keep_best=5)."
        )
    return int(match.group(1))


def kept_score(payload: dict) -> float | None:
    """The validation accuracy that kept this checkpoint (its entry in the ranking it was saved with)."""
    for entry in payload.get("kept_best") or []:
        if entry.get("step") == payload.get("step"):
            return entry["val_accuracy"]
    return payload.get("best_val_accuracy")  # best.pt written before train.keep_best: its own score


def ranked_checkpoints(run_dir: Path) -> list[tuple[str, dict]]:
    """The run's kept validation checkpoints, best first: (file under checkpoints/, payload).

    best.pt and next_best/step-*.pt, ranked by the validation accuracy each was kept for, ties to the
    earlier step, as training ranks them.
    """
    folder = Path(run_dir) / "checkpoints"
    paths = [folder / "best.pt"] if (folder / "best.pt").is_file() else []
    paths += [path for _, path in sorted(next_best_files(run_dir).items())]
    found = [(str(path.relative_to(folder)), load_checkpoint(path)) for path in paths]

    def rank(item):
        score = kept_score(item[1])
        return (-score if score is not None else math.inf, item[1]["step"])

    return sorted(found, key=rank)


def keep_copy(source: Path, target: Path) -> None:
    """`target` becomes a copy of `source`, atomically: a hard link where the file system has them, else a copy.

    A later atomic save over `source` (a new file) leaves the copy as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError as err:
        run_dir = run_of(target)
        raise MetalearnError(
            f"could not write {target} ({write_failure(err)}). Free space on that disk (or lift the limit), then "
            f"continue with: metalearn train resume={shlex.quote(str(run_dir))}"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def write_failure(err: Exception) -> str:
    """Why a write failed, in words: the OS error, or the gist of torch's serializer error."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.strerror or errno.errorcode.get(err.errno, str(err.errno))
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text.split("] ", 1)[-1][:200]  # torch: "[enforce fail at inline_container.cc:NNN] . <what>"


def non_finite(value, where: str = "") -> list:
    """Where a checkpoint payload holds NaN or infinite floating-point values."""
    import torch

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
        run_dir = run_of(path)
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
        import torch  # here, not at the top: the CLI answers --help and --cfg without loading torch

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
            f"{path} has checkpoint format version {payload.get('version')!r}; this metalearn reads version {VERSION}."
        )
    problems = structure_problems(payload)
    if problems:
        raise MetalearnError(
            f"{path} is a damaged metalearn checkpoint: {'; '.join(problems[:4])}. Use the other checkpoint of "
            f"the run (checkpoint=best or checkpoint=last)."
        )
    return payload


def load_algo_state(algo, state: dict, path: Path) -> None:
    """`algo.load_state_dict(state)` of a file's state; a state of another shape than this algorithm's is an
    error that names the file (the model's weights are checked by name and shape, the rest is caught here)."""
    try:
        algo.load_state_dict(state)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RuntimeError) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise MetalearnError(
            f"{path} does not fit this configuration ({type(err).__name__}{': ' if reason else ''}{reason}). Use "
            f"the settings it was trained with."
        ) from None


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rng_state(value) -> bool:
    """A CPU random generator's state, as torch.get_rng_state() gives it."""
    import torch

    return isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.shape == torch.get_rng_state().shape


def _weights(value) -> bool:
    import torch

    return isinstance(value, dict) and bool(value) and all(isinstance(w, torch.Tensor) for w in value.values())


WINDOW = ("loss", "accuracy", "steps", "items", "seconds")  # the training metrics summed since the last record
# What every checkpoint `save_checkpoint` writes holds, and the test of each entry (eval, export and resume
# read them: a file without one is an error that names it, not a KeyError).
REQUIRED = {
    "step": ("a count", _count),
    "algo": (
        "the algorithm's state with its model weights",
        lambda v: isinstance(v, dict) and _weights(v.get("model")),
    ),
    "sampler": ("the task sampler's state", lambda v: isinstance(v, dict)),
    "torch_rng": ("torch's random state", _rng_state),
    "best_val_accuracy": ("a number", _number),
    "window": ("the metrics window", lambda v: isinstance(v, dict) and all(_number(v.get(k)) for k in WINDOW)),
    "train_classes": ("a count", _count),
    "config": ("the run's config", lambda v: isinstance(v, dict)),
}


def _kept_entry(entry) -> bool:
    if not isinstance(entry, dict):
        return False
    step = entry.get("step")  # None: a step not known yet (a run resumed from before train.keep_best)
    return (step is None or _count(step)) and _number(entry.get("val_accuracy"))


def structure_problems(payload: dict) -> list[str]:
    """What a loaded checkpoint lacks or holds of the wrong type; empty for a sound one."""
    problems = [f"no {key} ({what})" for key, (what, _) in REQUIRED.items() if key not in payload]
    problems += [
        f"its {key} is not {what}" for key, (what, ok) in REQUIRED.items() if key in payload and not ok(payload[key])
    ]
    sampler = payload.get("sampler") if isinstance(payload.get("sampler"), dict) else {}
    problems += sampler_problems(sampler)
    kept = payload.get("kept_best")
    if kept is not None and not (isinstance(kept, list) and all(_kept_entry(e) for e in kept)):
        problems.append("its kept_best is not a list of {step, val_accuracy}")
    return problems


def sampler_problems(sampler: dict) -> list[str]:
    """What the task sampler's state lacks to go on drawing (one without next_episode is an older format,
    which the sampler itself refuses with its own message)."""
    import torch

    if "next_episode" not in sampler:
        return []
    problems = []
    if not _count(sampler["next_episode"]):
        problems.append("its sampler's next_episode is not a count")
    if not _rng_state(sampler.get("generator")):
        problems.append("its sampler's generator is not a random state")
    buffer = sampler.get("replay_buffer")
    if buffer is not None and not (
        isinstance(buffer, torch.Tensor) and buffer.dim() == 3 and not buffer.is_floating_point()
    ):
        problems.append("its sampler's replay_buffer is not a tensor of task image ids")
    if "replay_next" in sampler and not _count(sampler["replay_next"]):
        problems.append("its sampler's replay_next is not a count")
    return problems
