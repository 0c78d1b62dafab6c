"""What the training loop calls after every step: metrics, validation, checkpoints.

The loop only trains; each hook decides when it acts. A hook's
`state_dict()` goes into last.pt (and best.pt) and comes back through
`load_state_dict` on resume, so a resumed run writes the same records as one
that ran straight through. Hooks beyond the built-in ones (a divergence
guard, a profiler) come from the config: each node under `hooks` names a
Hook subclass with `_target_`, is built with its other keys, and gets the
run's `LoopContext` in `start` (see `build_hooks`).
"""

import logging
import math
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from metalearn.algorithms import Algorithm
from metalearn.data import EpisodeSampler
from metalearn.distributed import SINGLE, Ranks
from metalearn.errors import MetalearnError
from metalearn.evaluate import run_episodes, warn_diverged
from metalearn.loggers import MetricWriter
from metalearn.storage.checkpoint import (
    NEXT_BEST,
    checkpoint_path,
    keep_copy,
    load_checkpoint,
    next_best_files,
    next_best_name,
)

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    step: int  # steps done
    steps: int  # train.steps
    started: float = field(default_factory=time.perf_counter)
    final: bool = False  # this step is the last though train.steps is not reached (train.max_minutes, pruned)
    pruned: bool = False  # an Optuna study's pruner stopped the run at this step (metalearn.study_trial)

    def due(self, every: int) -> bool:
        """Every `every` steps, and at the last step."""
        return self.step % every == 0 or self.step == self.steps or self.final

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


@dataclass
class LoopContext:
    """What a hook may use: the run's algorithm, folder, metric writers and config, and checkpoint saving."""

    algo: Algorithm
    run_dir: Path
    writers: list[MetricWriter]
    cfg: DictConfig
    save: Callable[[str], None]  # save("best"), save("last") or save(next_best_name(step))


class Hook:
    def start(self, context: LoopContext) -> None:
        """Called once before the first step (of this process: also on resume, after load_state_dict)."""

    def after_step(self, state: LoopState, result: dict[str, float], items: int, seconds: float) -> None:
        """Called after every training step; `result` is the algorithm's (at least loss and accuracy)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, checkpoint: dict) -> None: ...


class DivergenceGuard(Hook):
    """Stops the run, before anything of the step is written, when the loss or a weight is not finite."""

    def start(self, context):
        self.context = context

    def after_step(self, state, result, items, seconds):
        loss = result["loss"]
        weights = [p.detach() for p in self.context.algo.model.parameters()]
        weights_finite = bool(torch.stack([torch.isfinite(w).all() for w in weights]).all())
        if math.isfinite(loss) and weights_finite:
            return
        raise MetalearnError(diverged_message(self.context, state.step, loss, weights_finite))


def diverged_message(context: LoopContext, step: int, loss: float, weights_finite: bool) -> str:
    what = f"the training loss is {loss}" if not math.isfinite(loss) else "the loss is finite"
    what += ", the weights are finite" if weights_finite else ", and some weights are not finite"
    saved = []
    for which in ("last", "best"):
        path = checkpoint_path(context.run_dir, which)
        if path.is_file():
            saved.append(f"checkpoints/{which}.pt is from step {load_checkpoint(path)['step']}")
    kept = "; ".join(saved) if saved else "no checkpoint was written yet"
    run = shlex.quote(str(context.run_dir))
    return (
        f"training diverged at step {step}: {what}. Nothing of step {step} was saved ({kept}). Try a smaller "
        f"learning rate (algo.outer_lr, or algo.inner_lr for an inner loop) or device.amp=false in a new run; "
        f"`metalearn eval run={run}` scores what was saved."
    )


def write_all(writers: list[MetricWriter], record: dict) -> None:
    for writer in writers:
        writer.write(record)


def _new_window() -> dict:
    return {"loss": 0.0, "accuracy": 0.0, "steps": 0, "items": 0, "seconds": 0.0}


class TrainMetrics(Hook):
    """The mean loss and accuracy and the throughput over the last `every` steps, as one "train" record."""

    def __init__(self, writers: list[MetricWriter], every: int, rate_key: str):
        self.writers, self.every, self.rate_key = writers, every, rate_key
        self.window = _new_window()

    def after_step(self, state, result, items, seconds):
        w = self.window
        w["loss"] += result["loss"]
        w["accuracy"] += result["accuracy"]
        w["steps"] += 1
        w["items"] += items
        w["seconds"] += seconds
        if state.due(self.every):
            record = {
                "step": state.step,
                "split": "train",
                "loss": w["loss"] / w["steps"],
                "accuracy": w["accuracy"] / w["steps"],
                self.rate_key: w["items"] / max(w["seconds"], 1e-9),
                "time": state.elapsed(),
            }
            write_all(self.writers, record)
            self.window = _new_window()

    def state_dict(self):
        return {"window": dict(self.window)}

    def load_state_dict(self, checkpoint):
        self.window = dict(checkpoint["window"])


class Validation(Hook):
    """Scores the validation episodes every `every` steps and keeps the `keep` best checkpoints.

    Only a validation with a finite loss counts. The best is checkpoints/best.pt; with `keep` > 1
    (train.keep_best) the 2nd..`keep`th best are checkpoints/next_best/step-<step>.pt, ranked by accuracy,
    ties to the earlier step; a checkpoint that drops out of them is deleted. The ranking (`kept_best`)
    goes into every checkpoint, so a resumed run goes on with the same set, and the files are made to
    match the ranking of last.pt (those written after it, by a process that stopped before saving it
    again, are removed: the resumed run writes them again).
    """

    def __init__(
        self,
        algo: Algorithm,
        sampler: EpisodeSampler,
        writers: list[MetricWriter],
        every: int,
        episodes: int,
        batch_size,
        save: Callable[[str], None],
        ranks: Ranks = SINGLE,
        keep: int = 1,
    ):
        self.algo, self.sampler, self.writers, self.ranks = algo, sampler, writers, ranks
        self.every, self.episodes, self.batch_size = every, episodes, batch_size
        self.save, self.keep = save, keep
        self.best = -1.0
        self.kept: list[dict] = []  # {"step", "val_accuracy"} of the kept checkpoints, best first
        self.last: dict | None = None  # the latest validation of this process: {"step", "accuracy", "loss"}
        self.run_dir = None

    def start(self, context):
        self.run_dir = context.run_dir
        if self.ranks.main:  # rank 0 alone writes the run folder
            self._match_files()

    def after_step(self, state, result, items, seconds):
        if not state.due(self.every):
            return
        val = run_episodes(self.algo, self.sampler, self.episodes, self.batch_size, "validating", self.ranks)
        write_all(
            self.writers,
            {
                "step": state.step,
                "split": "val",
                "loss": val.loss,
                "accuracy": val.accuracy,
                "ci95": val.ci95,
                "episodes": val.episodes,
                "diverged_episodes": val.diverged_episodes,
                "time": state.elapsed(),
            },
        )
        log.info("step %d: val accuracy %.2f%% ± %.2f", state.step, 100 * val.accuracy, 100 * val.ci95)
        self.last = {"step": state.step, "accuracy": val.accuracy, "loss": val.loss}
        warn_diverged([val], [f"step {state.step}"], "validation")
        # a kept checkpoint only from a real score: a finite validation loss
        if math.isfinite(val.loss):
            self.best = max(self.best, val.accuracy)
            self._keep(state.step, val.accuracy)

    def _keep(self, step: int, accuracy: float) -> None:
        """Rank the checkpoint of `step` among the kept ones; write it if it is one of the `keep` best."""
        if len(self.kept) >= self.keep and accuracy <= self.kept[-1]["val_accuracy"]:
            return  # not better than the last kept one (a tie goes to the earlier step)
        entry = {"step": step, "val_accuracy": accuracy}
        previous = self.kept[0]["step"] if self.kept else None
        # a step not known yet (a resumed run from before train.keep_best, on a rank that does not read best.pt)
        # is an earlier one
        ranked = sorted([*self.kept, entry], key=lambda e: (-e["val_accuracy"], -1 if e["step"] is None else e["step"]))
        self.kept, dropped = ranked[: self.keep], ranked[self.keep :]
        if self.kept[0] is entry:
            if self.ranks.main and self.keep > 1 and previous is not None:  # the best so far becomes the second
                second = checkpoint_path(self.run_dir, next_best_name(previous))
                keep_copy(checkpoint_path(self.run_dir, "best"), second)
            self.save("best")
        else:
            self.save(next_best_name(step))
        if self.ranks.main:
            for gone in dropped:
                checkpoint_path(self.run_dir, next_best_name(gone["step"])).unlink(missing_ok=True)

    def _match_files(self) -> None:
        """Make best.pt and next_best/ hold the ranking restored from last.pt (or nothing, on a new run)."""
        best_path = checkpoint_path(self.run_dir, "best")
        files = next_best_files(self.run_dir)
        self.kept = self.kept[: self.keep]  # resumed with a smaller train.keep_best
        if self.kept and (self.keep > 1 or self.kept[0]["step"] is None):
            try:
                on_disk = load_checkpoint(best_path)["step"] if best_path.is_file() else None
            except MetalearnError:
                on_disk = None
            if self.kept[0]["step"] is None:  # last.pt of a version before train.keep_best: best.pt is the best
                self.kept = [{**self.kept[0], "step": on_disk}] if on_disk is not None else []
            if self.keep > 1:
                self._restore(best_path, on_disk, files)
        wanted = {entry["step"] for entry in self.kept[1:]}
        for step, path in files.items():
            if step not in wanted:
                path.unlink(missing_ok=True)
                log.info("removed checkpoints/%s/%s: it is not one of the %d best", NEXT_BEST, path.name, self.keep)

    def _restore(self, best_path: Path, on_disk, files: dict[int, Path]) -> None:
        """best.pt written after last.pt (by a process stopped before saving last.pt again): the best
        kept one takes its place again; kept checkpoints whose file is gone leave the ranking."""
        present = []
        for entry in self.kept:
            if entry["step"] == on_disk or entry["step"] in files:
                present.append(entry)
            else:
                log.warning(
                    "the checkpoint of step %d, ranked among the %d best in last.pt, is gone: it leaves the "
                    "ranking (steps validated since last.pt are validated again)",
                    entry["step"],
                    self.keep,
                )
        self.kept = present
        if not self.kept or self.kept[0]["step"] == on_disk:
            return
        if on_disk in {entry["step"] for entry in self.kept} and on_disk not in files:
            keep_copy(best_path, checkpoint_path(self.run_dir, next_best_name(on_disk)))
            files[on_disk] = checkpoint_path(self.run_dir, next_best_name(on_disk))
        os.replace(files.pop(self.kept[0]["step"]), best_path)
        log.info("checkpoints/best.pt is step %d's again, the best in last.pt", self.kept[0]["step"])

    def state_dict(self):
        return {"best_val_accuracy": self.best, "kept_best": [dict(entry) for entry in self.kept]}

    def load_state_dict(self, checkpoint):
        self.best = checkpoint["best_val_accuracy"]
        kept = checkpoint.get("kept_best")
        if kept is None:  # a checkpoint from before train.keep_best: best.pt alone, its step read in start()
            kept = [{"step": None, "val_accuracy": self.best}] if self.best >= 0 else []
        self.kept = [dict(entry) for entry in kept]


class Checkpoints(Hook):
    """last.pt every `every` steps and at the end."""

    def __init__(self, every: int, save_last: Callable[[], None]):
        self.every, self.save_last = every, save_last

    def after_step(self, state, result, items, seconds):
        if state.due(self.every):
            self.save_last()


class ConfiguredHooks(Hook):
    """The hooks the config names under `hooks`, run in order; their states kept under their names."""

    def __init__(self, nodes: dict[str, Any]):
        self.hooks = {}
        for name, node in (nodes or {}).items():
            try:
                hook = instantiate(node)
            except Exception as err:
                reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
                raise MetalearnError(f"hooks.{name} cannot be built ({reason}).") from None
            if not isinstance(hook, Hook):
                raise MetalearnError(f"hooks.{name}: {type(hook).__name__} is not a metalearn Hook.")
            self.hooks[name] = hook

    def start(self, context):
        for hook in self.hooks.values():
            hook.start(context)

    def after_step(self, state, result, items, seconds):
        for hook in self.hooks.values():
            hook.after_step(state, result, items, seconds)

    def state_dict(self):
        return {"hooks": {name: hook.state_dict() for name, hook in self.hooks.items()}} if self.hooks else {}

    def load_state_dict(self, checkpoint):
        saved = checkpoint.get("hooks", {})
        for name, hook in self.hooks.items():
            if name in saved:
                hook.load_state_dict(saved[name])
