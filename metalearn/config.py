"""Structured-config schema: every key, its type and its default.

Hydra merges the YAML files in ``conf/`` onto these dataclasses, so a
misspelled key or a value of the wrong type fails before anything runs and
the error names the key.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from metalearn.device import switch
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


class AdaptedParams(Enum):
    all = "all"  # MAML: the inner loop adapts every weight
    head = "head"  # ANIL: only the linear head; the body is reused as it is


class InnerLoss(Enum):
    mean = "mean"  # the mean cross-entropy over the support set
    # Finn et al.'s code: the sum over the support set of each example's loss divided by the shots,
    # i.e. ways x the mean, so the same inner_lr takes a ways-times larger step.
    sum_over_shots = "sum_over_shots"


class InnerOptimizer(Enum):
    sgd = "sgd"
    adam = "adam"


@dataclass
class AlgoConfig:
    """Keys every algorithm has. Training episodes may differ from evaluated tasks (null: data.*)."""

    name: str = MISSING
    outer_lr: float = 1e-3
    train_ways: Optional[int] = None
    train_shots: Optional[int] = None
    train_queries: Optional[int] = None


@dataclass
class MAMLConfig(AlgoConfig):
    """MAML, first-order MAML, ANIL (adapt=head) and Meta-SGD (learn_inner_lr)."""

    inner_lr: float = 0.4
    inner_steps: int = 1
    inner_steps_eval: int = 10
    first_order: bool = False
    inner_loss: InnerLoss = InnerLoss.mean
    vectorize: Vectorize = Vectorize.auto
    adapt: AdaptedParams = AdaptedParams.all
    # Meta-SGD: one learned inner rate per weight, first drawn uniformly from this range.
    learn_inner_lr: bool = False
    inner_lr_init: List[float] = field(default_factory=lambda: [0.005, 0.1])


@dataclass
class ReptileConfig(AlgoConfig):
    inner_lr: float = 1e-3
    inner_steps: int = 5
    inner_batch: int = 10  # images per inner step, drawn from the task without replacement
    inner_optimizer: InnerOptimizer = InnerOptimizer.adam
    inner_steps_eval: int = 50
    inner_batch_eval: int = 5
    outer_lr_final: float = 0.0  # the outer step size anneals linearly from outer_lr to this ...
    anneal_steps: Optional[int] = None  # ... over this many steps; null: train.steps when the run starts
    vectorize: Vectorize = Vectorize.auto


@dataclass
class ProtoNetConfig(AlgoConfig):
    lr_decay: float = 0.5  # the outer learning rate is multiplied by this ...
    lr_decay_every: int = 2000  # ... every this many steps
    vectorize: Vectorize = Vectorize.auto


@dataclass
class FinetuneConfig(AlgoConfig):
    """Pretrain a classifier on all meta-train classes; fit a new head on each support set."""

    batch_size: int = 16  # images per pretraining step
    head_lr: float = 0.01
    head_momentum: float = 0.9
    head_dampening: float = 0.9
    head_weight_decay: float = 0.001
    head_steps: int = 100


@dataclass
class DistillConfig(FinetuneConfig):
    teacher: str = MISSING  # a finished finetune (or distill) run folder
    temperature: float = 4.0
    distill_weight: float = 0.5  # share of the loss on the teacher's soft targets; the rest is cross-entropy


ALGO_SCHEMAS = {
    "maml": MAMLConfig,
    "reptile": ReptileConfig,
    "protonet": ProtoNetConfig,
    "finetune": FinetuneConfig,
    "distill": DistillConfig,
}


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
    # bf16 autocast for the convolutional body: auto (where the hardware has native bf16: AVX512-BF16 or AMX
    # CPUs, bf16 GPUs), true or false. A string, as YAML reads true/false as booleans.
    amp: str = "auto"
    channels_last: bool = True  # NHWC memory format for the convolutions of a loop over tasks (same maths)


@dataclass
class TrainLoopConfig:
    steps: int = 60000
    meta_batch_size: int = 32
    val_every: int = 500
    val_episodes: int = 100
    val_seed: int = 0  # validation episodes: the same tasks at every validation, any meta-batch size
    ckpt_every: int = 500
    log_every: int = 50


@dataclass
class EvalConfig:
    episodes: int = 600
    seed: int = 0  # fixed, so two checkpoints are scored on the same episodes
    batch_size: Optional[int] = None  # episodes scored at once; null: all that fit on a GPU, 50 on a CPU


@dataclass
class TrainAppConfig:
    algo: Any = MISSING  # typed by the algorithm's own schema (ALGO_SCHEMAS), named in its YAML
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    resume: Optional[str] = None  # a run folder to continue from its last.pt


@dataclass
class EvalAppConfig(TrainAppConfig):
    run: Any = MISSING  # a run folder, or a list of them to evaluate as an ensemble
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
    for name, schema in ALGO_SCHEMAS.items():
        store.store(group="schema/algo", name=name, node=schema)


def training_episode_shape(cfg: DictConfig) -> Tuple[int, int, int]:
    """(ways, shots, queries) of meta-training episodes: algo.train_* where set, else data.*."""
    a, d = cfg.algo, cfg.data

    def pick(override, default):
        return default if override is None else override

    return pick(a.train_ways, d.ways), pick(a.train_shots, d.shots), pick(a.train_queries, d.queries)


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
    if cfg.eval.get("batch_size") is not None:
        _require(cfg.eval.batch_size >= 1, f"eval.batch_size must be at least 1 or null (got {cfg.eval.batch_size}).")
    switch(cfg.device.amp, "device.amp")
    for key in ("outer_lr", "inner_lr", "head_lr", "temperature"):
        if key in a:
            _require(a[key] > 0, f"algo.{key} must be positive (got {a[key]}).")
    for key in (
        "inner_steps",
        "inner_steps_eval",
        "inner_batch",
        "inner_batch_eval",
        "batch_size",
        "head_steps",
        "lr_decay_every",
        "train_shots",
        "anneal_steps",
    ):
        if a.get(key) is not None:
            _require(a[key] >= 1, f"algo.{key} must be at least 1 (got {a[key]}).")
    if a.train_ways is not None:
        _require(a.train_ways >= 2, f"algo.train_ways must be at least 2 (got {a.train_ways}).")
    if a.train_queries is not None:
        _require(a.train_queries >= 0, f"algo.train_queries must be at least 0 (got {a.train_queries}).")
    if "distill_weight" in a:
        _require(0 <= a.distill_weight <= 1, f"algo.distill_weight must be in [0, 1] (got {a.distill_weight}).")
