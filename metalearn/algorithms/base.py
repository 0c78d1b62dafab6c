"""The one interface every algorithm implements; the runner knows nothing else.

An algorithm is a component (metalearn.config.settings): its YAML in conf/algo names
the class with `_target_`, the class's `Settings` dataclass types and checks
the algo.* keys, and the runner calls the constructor with each setting by
its name plus what the run provides (see `build_algorithm`). An algorithm
reads no files: a finished run it needs comes as a `SavedRun`.
"""

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from omegaconf import MISSING

from metalearn.data import Episodes, EpisodeSampler
from metalearn.device import PLAIN, FastPaths
from metalearn.distributed import SINGLE, Ranks
from metalearn.errors import MetalearnError

log = logging.getLogger(__name__)


@dataclass
class AlgoSettings:
    """The keys every algorithm has; an algorithm's own schema adds its settings, each checked in __post_init__."""

    _target_: str = MISSING  # the Algorithm subclass
    name: str = MISSING  # the name runs, logs and evaluation records show (fomaml, anil, ... for MAML's presets)


# What an algorithm's model ends in (`Algorithm.head`):
WAYS_HEAD = "ways"  # a linear head of task.ways outputs, so it meta-trains on task.ways-way episodes
EMBEDDING = "embedding"  # no head: the backbone's embedding
CLASS_HEAD = "classes"  # a classifier over every meta-training class


@dataclass(frozen=True)
class SavedRun:
    """A finished run that a setting names (see `Algorithm.saved_runs`), as the builder hands it over."""

    folder: str  # as the setting gives it
    read_checkpoint: Callable[[], dict]  # its checkpoints/last.pt, read when called: evaluation never needs it


class Algorithm(ABC):
    """Constructor: `__init__(self, model, <each Settings key>, [workers, train_steps], ranks, fast_paths)`;
    it hands `model`, `ranks` and `fast_paths` to `Algorithm.__init__`.

    The runner (`build_algorithm`) builds `model` from model.* with the head
    `head` asks for, and gives each constructor those of the other keys it
    takes: the CPU worker threads, train.steps when the run starts, the run's
    processes and the fast paths of the device. A setting listed in
    `saved_runs` names a finished run's folder: the constructor gets a
    `SavedRun` for it.
    """

    Settings = AlgoSettings
    head = WAYS_HEAD
    model: torch.nn.Module
    needs_queries = True  # meta-training reads the episodes' query sets
    throughput_unit = "tasks"  # what one training batch counts, for the tasks/s (images/s) figure
    saved_runs: tuple[str, ...] = ()  # settings that name a finished run's folder (e.g. a teacher)
    # The run's processes (metalearn.distributed): the loop gives each its slice of the batch, and the
    # algorithm averages its update over them (ranks.average_gradients) before applying it. These class
    # values serve a constructor that does not call Algorithm.__init__: one process, plain float32.
    ranks: Ranks = SINGLE
    fast_paths: FastPaths = PLAIN  # what the model computes on (bf16 autocast, channels-last), and why
    # True where the peak memory must not grow with what a step frees and allocates again (device.allocator=auto
    # then has the C library return freed blocks instead of keeping them for reuse; metalearn.allocator).
    flat_peak = False

    def __init__(self, model: torch.nn.Module, ranks: Ranks = SINGLE, fast_paths: FastPaths = PLAIN):
        self.model, self.ranks, self.fast_paths = model, ranks, fast_paths

    @classmethod
    def bf16_caveat(cls, settings) -> str | None:
        """Why `device.amp=auto` keeps these settings in float32 on hardware with native bf16, or None.

        auto takes bf16 only where it moves the algorithm's update no further
        from float64's than rounding the weights to bf16 does (`bench.py
        fidelity`, docs/performance.md); an algorithm says here where it does not.
        """
        return None

    def sample(self, sampler: EpisodeSampler, meta_batch_size: int):
        """The next training batch: a meta-batch of episodes unless the algorithm trains on something else."""
        return sampler.sample(meta_batch_size)

    @abstractmethod
    def meta_train_step(self, episodes: Episodes) -> dict[str, float]:
        """One outer update on a batch of tasks; returns at least loss and accuracy."""

    @abstractmethod
    def predict(self, episodes: Episodes) -> torch.Tensor:
        """Adapt on each support set, return query logits [T, ways*queries, ways]."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume: plain tensors and containers only."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    # An algorithm with an outer optimizer builds it at first use (a functools.cached_property named
    # `optimizer`): torch's first optimizer imports torch._dynamo, 2 s that evaluation never needs.

    def check_resume(self, train_steps: int) -> None:
        """A resumed run is about to train to `train_steps`: refuse, with what to do, what cannot work."""


def load_model_state(model: torch.nn.Module, state: dict, what: str) -> None:
    """Load weights, turning a shape or key mismatch into an error that says which."""
    mine = model.state_dict()
    problems = [f"missing {k}" for k in mine if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in mine]
    problems += [
        f"{k} is {tuple(state[k].shape)} there, {tuple(v.shape)} here"
        for k, v in mine.items()
        if k in state and state[k].shape != v.shape
    ]
    statistics = ("running_mean", "running_var", "num_batches_tracked")
    differ = set(mine) ^ set(state)
    if differ and all(k.endswith(statistics) for k in differ):
        trained = "inductive" if any(k.endswith(statistics) for k in state) else "transductive"
        raise MetalearnError(
            f"{what} was trained with model.bn={trained} (BatchNorm "
            f"{'with' if trained == 'inductive' else 'without'} running statistics): use model.bn={trained}."
        )
    if problems:
        raise MetalearnError(
            f"{what} does not fit this configuration ({'; '.join(problems[:3])}). "
            f"Its model was built with other settings (for MAML, task.ways sets the head's size): "
            f"use the settings it was trained with."
        )
    model.load_state_dict(state)


def load_optimizer(optimizer: torch.optim.Optimizer, state: dict, scheduler=None) -> None:
    """The optimizer's (and scheduler's) saved state; a learning rate configured now replaces the saved one.

    Without this, `resume=<run> algo.outer_lr=<new>` would train on at the checkpoint's rate. A schedule
    keeps its progress: the rate is the new one times the decay reached so far.
    """
    configured = [group["lr"] for group in optimizer.param_groups]
    optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    for i, (group, lr) in enumerate(zip(optimizer.param_groups, configured, strict=False)):
        initial = group.get("initial_lr", group["lr"])
        if initial == lr:
            continue
        group["lr"] = lr * group["lr"] / initial
        if "initial_lr" in group:
            group["initial_lr"] = lr
        if scheduler is not None:
            scheduler.base_lrs[i] = lr
        log.info("algo.outer_lr=%g replaces the checkpoint's %g", lr, initial)
