"""The run's own keys (task, train, eval, device), their types, defaults and range checks.

Hydra merges the YAML files in ``conf/`` onto these dataclasses, so a
misspelled key or a value of the wrong type fails before anything runs and
the error names the key. The components (algo, data, model) carry their own
schemas (metalearn.config.settings); `validate` checks every node against its schema.
"""

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from metalearn.allocator import Allocator
from metalearn.config.settings import SWITCHES, SettingError, at_least, prefixed, seed


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
class TrainingEpisodes:
    """The shape of meta-training episodes where an algorithm trains on other tasks than it is tested on."""

    ways: int | None = None  # null: task.ways
    shots: int | None = None  # null: task.shots
    queries: int | None = None  # null: task.queries; 0 for an algorithm that only adapts (Reptile)

    def check(self):
        at_least(self, "ways", 2, optional=True)
        at_least(self, "shots", 1, optional=True)
        at_least(self, "queries", 0, optional=True)


@dataclass
class TaskConfig:
    """The few-shot task: validated and tested on ways x (shots + queries) episodes."""

    ways: int = 5  # classes per task
    shots: int = 1  # support images per class
    queries: int = 15  # query images per class
    train: TrainingEpisodes = field(default_factory=TrainingEpisodes)

    def __post_init__(self):
        at_least(self, "ways", 2)
        at_least(self, "shots", 1)
        at_least(self, "queries", 1)
        with prefixed("train"):
            self.train.check()

    @staticmethod
    def training_shape(task: DictConfig) -> tuple[int, int, int]:
        """(ways, shots, queries) of meta-training episodes: task.train.* where set, else task.*."""
        t = task.train
        return tuple(task[k] if t[k] is None else t[k] for k in ("ways", "shots", "queries"))


@dataclass
class ReplayConfig:
    """Task replay: mix earlier meta-training tasks back into each meta-batch."""

    fraction: float = 0.0  # share of each meta-batch drawn from the buffer; 0 turns replay off
    size: int = 1000  # tasks kept, the oldest replaced first

    def check(self):
        if not 0 <= self.fraction < 1:
            raise SettingError("fraction", f"must be in [0, 1) (got {self.fraction}).")
        at_least(self, "size", 1)


@dataclass
class TrainLoopConfig:
    steps: int = 60000  # meta-iterations (the algorithm's YAML sets its paper's budget)
    meta_batch_size: int = 32  # tasks per meta-iteration (the training tasks do not depend on it)
    val_every: int = 500  # steps between validations (and at the last step)
    val_episodes: int = 100  # validation tasks scored each time
    val_seed: int = 0  # validation episodes: the same tasks at every validation, any meta-batch size
    ckpt_every: int = 500  # steps between writes of checkpoints/last.pt
    log_every: int = 50  # steps per "train" record in metrics.jsonl
    # validation checkpoints kept: the best in checkpoints/best.pt, the 2nd..Nth best in
    # checkpoints/next_best/step-<step>.pt (ranked by validation accuracy, ties to the earlier step);
    # `metalearn eval checkpoint=topN` scores their ensemble.
    keep_best: int = 1
    # Stop after this much training time of the process (minutes), validating and saving at that step, as at
    # train.steps; `resume=<run>` goes on with a new budget. null: train.steps alone decides.
    max_minutes: float | None = None
    replay: ReplayConfig = field(default_factory=ReplayConfig)

    def __post_init__(self):
        for key in ("steps", "meta_batch_size", "val_every", "val_episodes", "ckpt_every", "log_every", "keep_best"):
            at_least(self, key, 1)
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise SettingError("max_minutes", f"must be above 0, or null for no time limit (got {self.max_minutes}).")
        seed(self, "val_seed")
        with prefixed("replay"):
            self.replay.check()


class EnsembleMean(Enum):
    probabilities = "probabilities"  # the mean of the members' class probabilities
    logits = "logits"  # the mean of the members' logits (MAML++'s code)


@dataclass
class EvalConfig:
    episodes: int = 600  # test tasks; the result is their mean accuracy with a 95% confidence interval
    seed: int = 0  # fixed, so two checkpoints are scored on the same episodes
    batch_size: int | None = None  # episodes scored at once; null: all that fit on a GPU, 50 on a CPU
    # what an ensemble (checkpoint=topN, run=[a,b,...]) averages per query: probabilities (the members' class
    # probabilities) or logits (their logits, as MAML++'s code)
    ensemble: EnsembleMean = EnsembleMean.probabilities

    def __post_init__(self):
        at_least(self, "episodes", 1)
        at_least(self, "batch_size", 1, optional=True)
        seed(self, "seed")


class Precision(Enum):
    float32 = "float32"
    float64 = "float64"


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto, cpu, cuda or cuda:N
    # bf16 autocast for the convolutional body: auto (where the hardware has native bf16: AVX512-BF16 or AMX
    # CPUs, bf16 GPUs, unless the algorithm's settings lose accuracy in bf16: ANIL with several inner steps,
    # learned inner rates), true or false. A string, as YAML reads true/false as booleans.
    amp: str = "auto"
    channels_last: bool = True  # NHWC memory format for the convolutions of a loop over tasks (same maths)
    # float32, or float64 for a reference run (slower; no bf16 autocast): results to ~1e-10 across
    # process counts and summation orders, where float32's rounding, which Adam amplifies, shows.
    dtype: Precision = Precision.float32
    # A run on several processes (torchrun): seconds a process waits for the others before it stops with an error.
    dist_timeout_s: int = 300
    # What the C library (glibc) does with the large blocks a CPU step frees: keep (reused at the next step, no
    # page faults, a higher peak), release (blocks of 1 MiB and more returned: the lowest peak), system (as it
    # is), or auto: release for algo.checkpoint_inner's flat peak, keep otherwise, system on a GPU.
    allocator: Allocator = Allocator.auto

    def __post_init__(self):
        at_least(self, "dist_timeout_s", 1)
        if str(self.amp).strip().lower() not in SWITCHES:
            raise SettingError("amp", f"must be auto, true or false (got {self.amp!r}).")


@dataclass
class TrainAppConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    # The components: each typed by the schema of the class its YAML names (`_target_`), see validate().
    algo: Any = MISSING
    data: Any = MISSING
    model: Any = MISSING
    device: DeviceConfig = field(default_factory=DeviceConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Metric writers besides metrics.jsonl, each a `_target_` node: logger=<name> or logger=[<name>,...].
    loggers: dict[str, Any] = field(default_factory=dict)
    # Training-loop hooks besides metrics, validation and checkpoints, each a `_target_` node (metalearn.hooks).
    hooks: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # model initialisation and training tasks
    resume: str | None = None  # a run folder to continue from its last.pt
    # When the run's folder already holds this run (its last.pt, the same settings): `resume` it, or `refuse`.
    # auto: a sweep's run resumes (a sweep run again into its folder, a requeued SLURM job), a single run refuses.
    existing_run: str = "auto"


@dataclass
class EvalAppConfig(TrainAppConfig):
    run: Any = MISSING  # a run folder, or a list of them to evaluate as an ensemble
    # which checkpoint of the run is scored: best, last, or topN (e.g. top5), the ensemble of its N best
    # validation checkpoints (a run trained with train.keep_best=N or more)
    checkpoint: str = "best"


@dataclass
class DataAppConfig(TrainAppConfig):
    action: DataAction = DataAction.info  # `data info` (what each part holds) or `data preview` (a PNG)
    part: SplitPart = SplitPart.train  # which part `preview` samples from
    out: str | None = None  # preview PNG path; null: preview-<data>-<part>-<ways>w<shots>s.png


@dataclass
class ExportAppConfig:
    run: str = MISSING  # the run folder
    checkpoint: CheckpointName = CheckpointName.best  # which of its checkpoints
    out: str | None = None  # the .safetensors file; null: <run>/<checkpoint>.safetensors


def register_schemas() -> None:
    store = ConfigStore.instance()
    store.store(name="export_schema", node=ExportAppConfig)
    store.store(name="train_schema", node=TrainAppConfig)
    store.store(name="eval_schema", node=EvalAppConfig)
    store.store(name="data_schema", node=DataAppConfig)
