"""Building the algorithm a config names; each implements metalearn.algorithms.base.Algorithm.

Nothing here knows any one algorithm: conf/algo/<name>.yaml names the class
with `_target_`, the class's `Settings` checks algo.*, and the constructor
takes each setting by name (metalearn.config.settings.construct) plus its model,
whose head the class's `head` asks for, and what the run provides. The files
an algorithm needs are read here: a setting the class lists in `saved_runs`
comes as a `SavedRun` that reads the run's last checkpoint when asked.
"""

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from metalearn.algorithms.base import CLASS_HEAD, EMBEDDING, WAYS_HEAD, Algorithm, SavedRun
from metalearn.algorithms.batching import cpu_workers
from metalearn.allocator import configure as configure_allocator
from metalearn.config.schema import TaskConfig
from metalearn.config.settings import component_class, construct, settings_of
from metalearn.device import resolve_fast_paths
from metalearn.distributed import SINGLE, Ranks
from metalearn.errors import MetalearnError
from metalearn.models import CHANNELS_LAST, NCHW, build_model
from metalearn.storage.checkpoint import checkpoint_path, load_checkpoint

log = logging.getLogger(__name__)


def head_size(cls: type, cfg: DictConfig, train_classes: int) -> int:
    """The model's outputs for an algorithm of class `cls` (see Algorithm.head)."""
    if cls.head == EMBEDDING:
        return 0
    if cls.head == CLASS_HEAD:
        return train_classes
    ways = cfg.task.ways
    if TaskConfig.training_shape(cfg.task)[0] != ways:
        raise MetalearnError(
            f"algo={cfg.algo.name} adapts a {ways}-way head, so it trains on {ways}-way tasks: "
            f"leave task.train.ways unset."
        )
    return ways


def build_algorithm(
    cfg: DictConfig,
    device: torch.device,
    train_classes: int,
    image_shape,
    dtype: torch.dtype | None = None,
    ranks: Ranks = SINGLE,
) -> Algorithm:
    """The algorithm cfg.algo names, its model built from cfg.model for `image_shape` images, on `device`.

    The model computes on the fast paths device.amp / device.channels_last
    resolve to on this device and for this algorithm (algo.fast_paths says which and why); `dtype`
    float64 serves reference checks (default: device.dtype); `ranks` are the
    run's processes (default: this one alone).
    """
    dtype = dtype or run_dtype(cfg)
    cls = component_class(cfg.algo, "algo")
    if not issubclass(cls, Algorithm):
        raise MetalearnError(f"algo._target_={cfg.algo._target_} is not an Algorithm.")
    settings = settings_of(cfg.algo, "algo")
    fast = resolve_fast_paths(cfg.device, device, cls.bf16_caveat(settings))
    layout = CHANNELS_LAST if fast.channels_last else NCHW
    model = build_model(cfg.model, head_size(cls, cfg, train_classes), image_shape, amp=fast.amp, layout=layout)
    runs = {key: saved_run(getattr(settings, key)) for key in cls.saved_runs}
    algo = construct(
        cls,
        settings,
        skip=("_target_", "name", *runs),
        model=model.to(device, dtype),
        workers=cpu_workers(device),
        train_steps=cfg.train.steps,
        ranks=ranks,
        fast_paths=fast,
        **runs,
    )
    log.info("memory: %s", configure_allocator(cfg.device.allocator, device, algo.flat_peak))
    if ranks.active and algo.ranks is not ranks:  # else each process would take its own step
        raise MetalearnError(
            f"algo={cfg.algo.name} cannot train on several processes: its constructor does not hand `ranks` "
            f"to Algorithm.__init__ (see metalearn.algorithms.base.Algorithm)."
        )
    return algo


def saved_run(folder: str | None) -> SavedRun | None:
    """The finished run in `folder` (None: no run); its last checkpoint is read when asked, not here."""
    if folder is None:
        return None
    return SavedRun(folder, lambda: load_checkpoint(checkpoint_path(Path(folder), "last")))


def run_dtype(cfg: DictConfig) -> torch.dtype:
    """The floating-point type of the run's weights and images (device.dtype)."""
    precision = OmegaConf.select(cfg, "device.dtype", default="float32")
    return getattr(torch, getattr(precision, "value", precision))  # an Enum in a checked config


__all__ = [
    "Algorithm",
    "CLASS_HEAD",
    "EMBEDDING",
    "SavedRun",
    "WAYS_HEAD",
    "build_algorithm",
    "head_size",
    "run_dtype",
    "saved_run",
]
