"""The transfer baselines: pretrain + fine-tune, and self-distillation on top.

`finetune` (the "Baseline" of Chen et al. 2019, "A Closer Look at Few-shot
Classification"): train the network as an ordinary classifier over all
meta-train classes; at test time freeze it, and fit a new linear head on each
task's support embeddings with SGD (Chen et al.'s settings: lr 0.01,
momentum 0.9, dampening 0.9, weight decay 1e-3). The heads of a whole batch
of tasks are fitted at once as one batched tensor.

`distill` (Tian et al. 2020, "Rethinking Few-Shot Image Classification"): a
student of the same architecture trained on a mix of the labels'
cross-entropy and the KL divergence to a finished teacher run's softened
outputs (temperature 4, half and half as in the paper's code), evaluated
like `finetune`.
"""

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn.algorithms.base import CLASS_HEAD, Algorithm, AlgoSettings, SavedRun, load_model_state, load_optimizer
from metalearn.algorithms.batching import TaskThreads, detached_params, sub_params
from metalearn.config.settings import SettingError, at_least, positive, within
from metalearn.data import Episodes, EpisodeSampler, LabelledImages
from metalearn.device import PLAIN, FastPaths
from metalearn.distributed import SINGLE, Ranks
from metalearn.errors import MetalearnError
from metalearn.models import CHANNELS_LAST, NCHW, across_ranks, build_model
from metalearn.models.batch_stats import BatchNormMode, recording


@dataclass
class FinetuneSettings(AlgoSettings):
    """Pretrain a classifier on all meta-train classes; fit a new head on each support set."""

    outer_lr: float = 1e-3  # Adam step size of the pretraining
    batch_size: int = 16  # images per pretraining step
    head_lr: float = 0.01  # SGD step size of each test task's new head
    head_momentum: float = 0.9  # ... its momentum
    head_dampening: float = 0.9  # ... dampening
    head_weight_decay: float = 0.001  # ... weight decay
    head_steps: int = 100  # ... and full-batch steps on the support set

    def __post_init__(self):
        positive(self, "outer_lr")
        positive(self, "head_lr")
        at_least(self, "batch_size", 1)
        at_least(self, "head_steps", 1)
        within(self, "head_momentum", 0, 1)
        within(self, "head_dampening", 0, 1)
        within(self, "head_weight_decay", 0, 1)


@dataclass
class DistillSettings(FinetuneSettings):
    teacher: str | None = None  # a finished finetune (or distill) run folder
    temperature: float = 4.0  # softens teacher and student outputs in the KL term
    distill_weight: float = 0.5  # share of the loss on the teacher's soft targets; the rest is cross-entropy

    def __post_init__(self):
        super().__post_init__()
        if self.teacher is None:
            raise SettingError(
                "teacher",
                "is not set: algo=distill learns from a finished run: add algo.teacher=<folder of a finetune "
                "or distill run trained on the same data and split>.",
            )
        positive(self, "temperature")
        within(self, "distill_weight", 0, 1)


class Finetune(Algorithm):
    Settings = FinetuneSettings
    head = CLASS_HEAD
    needs_queries = False
    throughput_unit = "images"

    def __init__(
        self,
        model: torch.nn.Module,
        outer_lr: float,
        batch_size: int,
        head_lr: float,
        head_momentum: float,
        head_dampening: float,
        head_weight_decay: float,
        head_steps: int,
        workers: int = 1,
        ranks: Ranks = SINGLE,
        fast_paths: FastPaths = PLAIN,
    ):
        super().__init__(model, ranks, fast_paths)
        self._threads = TaskThreads(model, workers)  # evaluation embeds a task per core at once
        self.batch_size = batch_size
        self.head_lr, self.head_momentum, self.head_dampening = head_lr, head_momentum, head_dampening
        self.head_weight_decay, self.head_steps = head_weight_decay, head_steps
        self.outer_lr = outer_lr

    @cached_property
    def optimizer(self) -> torch.optim.Optimizer:  # built at first use (see Algorithm)
        return torch.optim.Adam(self.model.parameters(), lr=self.outer_lr)

    def sample(self, sampler: EpisodeSampler, meta_batch_size: int) -> LabelledImages:
        return sampler.sample_images(self.batch_size)

    def loss(self, logits: torch.Tensor, batch: LabelledImages) -> torch.Tensor:
        return F.cross_entropy(logits, batch.labels)

    def meta_train_step(self, batch: LabelledImages) -> dict[str, float]:
        self.model.train()
        with across_ranks(self.model, self.ranks), recording([self.model]) as batch_statistics:
            # a batch split across processes: BatchNorm over all of it; model.bn=inductive: its statistics noted
            logits = self.model(batch.images)
            loss = self.loss(logits, batch)
        batch_statistics.commit(self.model, self.ranks)
        loss.backward()
        self.ranks.average_gradients(self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        accuracy = (logits.argmax(dim=-1) == batch.labels).float().mean()
        return {"loss": loss.item(), "accuracy": accuracy.item()}

    def fit_heads(self, support: torch.Tensor, labels: torch.Tensor, ways: int):
        """Linear heads (weight [T, ways, dim], bias [T, ways]) fitted on each task's support embeddings."""
        weight = support.new_zeros(support.shape[0], ways, support.shape[-1], requires_grad=True)
        bias = support.new_zeros(support.shape[0], ways, requires_grad=True)
        optimizer = torch.optim.SGD(
            [weight, bias],
            lr=self.head_lr,
            momentum=self.head_momentum,
            dampening=self.head_dampening,
            weight_decay=self.head_weight_decay,
        )
        with torch.enable_grad():
            for _ in range(self.head_steps):
                logits = torch.baddbmm(bias[:, None, :], support, weight.transpose(1, 2))
                # Summed over tasks: each head gets the gradient of its own task's mean loss.
                loss = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none").mean(dim=1).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        return weight.detach(), bias.detach()

    @torch.no_grad()
    def predict(self, episodes: Episodes) -> torch.Tensor:
        self.model.eval()
        shots = episodes.support.shape[1]

        def embed(model, params, sx, qx):
            with torch.no_grad():  # in the worker thread
                return functional_call(model.features, params, (torch.cat([sx, qx]),))

        features = sub_params(detached_params(self.model), "features")
        embedded = self._threads.over_tasks(embed)(features, episodes.support, episodes.query)
        support, query = embedded[:, :shots], embedded[:, shots:]
        weight, bias = self.fit_heads(support, episodes.support_labels, episodes.ways)
        return torch.baddbmm(bias[:, None, :], query, weight.transpose(1, 2))

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_model_state(self.model, state["model"], "The checkpoint")
        if "optimizer" in state:  # an exported model has the weights only (see storage.checkpoint.TRAINING_STATE)
            load_optimizer(self.optimizer, state)


def load_teacher(run: SavedRun, num_classes: int, images: torch.Tensor, fast: FastPaths) -> torch.nn.Module:
    """The network of a finished finetune/distill run, frozen, for its soft targets on `images`.

    It runs on the student's fast paths (bf16 autocast, channels-last), device and floating-point type.
    """
    ckpt, run_dir = run.read_checkpoint(), run.folder
    algo_name = ckpt["config"]["algo"]["name"]
    if algo_name not in ("finetune", "distill"):
        raise MetalearnError(
            f"algo.teacher={run_dir} is a {algo_name} run; the teacher must be a finetune or "
            f"distill run (a classifier over the meta-train classes)."
        )
    if ckpt.get("train_classes") != num_classes:
        raise MetalearnError(
            f"algo.teacher={run_dir} was trained on {ckpt.get('train_classes')} classes, this run "
            f"has {num_classes}: distil on the dataset and split the teacher was trained on."
        )
    teacher = build_model(
        ckpt["config"]["model"],
        num_classes,
        tuple(images.shape[1:]),
        amp=fast.amp,
        layout=CHANNELS_LAST if fast.channels_last else NCHW,
    ).to(images.device, images.dtype)
    load_model_state(teacher, ckpt["algo"]["model"], f"The teacher's checkpoint in {run_dir}")
    # As it was trained: batch statistics (transductive) or its running statistics (inductive)
    return teacher.train(teacher.batch_norm != BatchNormMode.inductive.value).requires_grad_(False)


class Distill(Finetune):
    Settings = DistillSettings
    saved_runs = ("teacher",)

    def __init__(
        self,
        model: torch.nn.Module,
        teacher: SavedRun,
        temperature: float,
        distill_weight: float,
        workers: int = 1,
        ranks: Ranks = SINGLE,
        fast_paths: FastPaths = PLAIN,
        **finetune_settings,
    ):
        super().__init__(model, workers=workers, ranks=ranks, fast_paths=fast_paths, **finetune_settings)
        self.teacher_run, self.temperature, self.distill_weight = teacher, temperature, distill_weight
        self._teacher = None  # loaded at the first training step: evaluation does not need it

    def loss(self, logits: torch.Tensor, batch: LabelledImages) -> torch.Tensor:
        if self._teacher is None:
            self._teacher = load_teacher(self.teacher_run, logits.shape[-1], batch.images, self.fast_paths)
        with torch.no_grad(), across_ranks(self._teacher, self.ranks):
            soft_targets = F.log_softmax(self._teacher(batch.images) / self.temperature, dim=-1)
        soft = (
            F.kl_div(
                F.log_softmax(logits / self.temperature, dim=-1), soft_targets, log_target=True, reduction="batchmean"
            )
            * self.temperature**2
        )
        return (1 - self.distill_weight) * F.cross_entropy(logits, batch.labels) + self.distill_weight * soft
