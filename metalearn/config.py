"""Structured-config schema: every key, its type and its default.

Hydra merges the YAML files in ``conf/`` onto these dataclasses, so a
misspelled key or a value of the wrong type fails before anything runs and
the error names the key.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from metalearn.errors import MetalearnError


class Vectorize(Enum):
    auto = "auto"  # vmap on CUDA, a loop over tasks on CPU
    vmap = "vmap"
    loop = "loop"


class DataAction(Enum):
    info = "info"
    preview = "preview"


class SplitPart(Enum):
    train = "train"
    val = "val"
    test = "test"


class CheckpointName(Enum):
    best = "best"
    last = "last"


@dataclass
class AlgoConfig:
    name: str = MISSING
    inner_lr: float = 0.4
    inner_steps: int = 1
    inner_steps_eval: int = 10
    outer_lr: float = 1e-3
    first_order: bool = False
    vectorize: Vectorize = Vectorize.auto


@dataclass
class ClassLists:
    """Which classes each part of a split draws from (datasets with few classes, e.g. MNIST)."""

    train: List[int] = MISSING
    val: List[int] = MISSING
    test: List[int] = MISSING


@dataclass
class ReplayConfig:
    """Task replay: mix earlier meta-training tasks back into each meta-batch."""

    fraction: float = 0.0  # share of each meta-batch drawn from the buffer; 0 turns replay off
    size: int = 1000  # tasks kept, the oldest replaced first


@dataclass
class DataConfig:
    name: str = "omniglot"
    root: str = "data"
    split: str = "vinyals"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    download: bool = False
    # Decoded-tensor cache; null means $METALEARN_CACHE or ~/.cache/metalearn.
    cache_dir: Optional[str] = None
    classes: Optional[ClassLists] = None
    replay: ReplayConfig = field(default_factory=ReplayConfig)


@dataclass
class ModelConfig:
    name: str = "conv4"
    hidden: int = 64


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto, cpu, cuda or cuda:N


@dataclass
class TrainLoopConfig:
    steps: int = 60000
    meta_batch_size: int = 32
    val_every: int = 500
    val_episodes: int = 100
    ckpt_every: int = 500
    log_every: int = 50


@dataclass
class EvalConfig:
    episodes: int = 600
    seed: int = 0  # fixed, so two checkpoints are scored on the same episodes


@dataclass
class TrainAppConfig:
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    resume: Optional[str] = None  # a run folder to continue from its last.pt


@dataclass
class EvalAppConfig(TrainAppConfig):
    run: str = MISSING
    checkpoint: CheckpointName = CheckpointName.best


@dataclass
class DataAppConfig(TrainAppConfig):
    action: DataAction = DataAction.info
    part: SplitPart = SplitPart.train  # which part `preview` samples from
    out: Optional[str] = None  # preview PNG path; null: preview-<data>-<part>-<ways>w<shots>s.png


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainAppConfig)
    store.store(name="eval_schema", node=EvalAppConfig)
    store.store(name="data_schema", node=DataAppConfig)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MetalearnError(message)


def validate(cfg: DictConfig) -> None:
    """Range checks the type system cannot express; each names the key."""
    d, t, a = cfg.data, cfg.train, cfg.algo
    _require(d.ways >= 2, f"data.ways must be at least 2 (got {d.ways}).")
    _require(d.shots >= 1, f"data.shots must be at least 1 (got {d.shots}).")
    _require(d.queries >= 1, f"data.queries must be at least 1 (got {d.queries}).")
    _require(t.steps >= 1, f"train.steps must be at least 1 (got {t.steps}).")
    _require(t.meta_batch_size >= 1, f"train.meta_batch_size must be at least 1 (got {t.meta_batch_size}).")
    for key in ("val_every", "val_episodes", "ckpt_every", "log_every"):
        _require(t[key] >= 1, f"train.{key} must be at least 1 (got {t[key]}).")
    _require(cfg.eval.episodes >= 1, f"eval.episodes must be at least 1 (got {cfg.eval.episodes}).")
    _require(a.inner_steps >= 1, f"algo.inner_steps must be at least 1 (got {a.inner_steps}).")
    _require(a.inner_steps_eval >= 1, f"algo.inner_steps_eval must be at least 1 (got {a.inner_steps_eval}).")
    _require(a.inner_lr > 0, f"algo.inner_lr must be positive (got {a.inner_lr}).")
    _require(a.outer_lr > 0, f"algo.outer_lr must be positive (got {a.outer_lr}).")
