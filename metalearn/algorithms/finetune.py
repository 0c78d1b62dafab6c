"""The transfer baselines: pretrain + fine-tune, and self-distillation on top.

`finetune` (the "Baseline" of Chen et al. 2019, "A Closer Look at Few-shot
Classification"): train the network as an ordinary classifier over all
meta-train classes; at test time freeze it, and fit a new linear head on each
task's support embeddings with SGD (Chen et al.'s settings: lr 0.01,
momentum 0.9, dampening 0.9, weight decay 1e-3). The heads of a whole batch
of tasks are fitted at once as one batched tensor.

Baseline++ (the same paper): `algo.classifier=cosine` pretrains a cosine classifier, logits s cos(w_c, x)
with the scale s of the authors' code (2 up to 200 classes, 10 above; `algo.cosine_scale` to set it), and
the test-time head is then a cosine head too. SimpleShot (Wang et al. 2019): `algo.test_head=simpleshot`
classifies each query by the nearest class centroid of the support embeddings after centring them on the
mean embedding of the training classes and L2-normalising them; that mean is kept during pretraining, a
running mean of the training batches' embeddings (`BASE_MEAN_MOMENTUM` per step).

`distill` (Tian et al. 2020, "Rethinking Few-Shot Image Classification"): a
student of the same architecture trained on a mix of the labels'
cross-entropy and the KL divergence to a finished teacher run's softened
outputs (temperature 4, half and half as in the paper's code), evaluated
like `finetune`.
"""

from dataclasses import dataclass
from enum import Enum
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


class Classifier(Enum):
    linear = "linear"  # logits W x + b (Baseline)
    cosine = "cosine"  # logits s cos(w_c, x) (Baseline++)


class TestHead(Enum):
    linear = "linear"  # a linear head fitted on each support set with SGD
    cosine = "cosine"  # a cosine head fitted the same way (Baseline++)
    simpleshot = "simpleshot"  # nearest centroid of centred, L2-normalised embeddings (SimpleShot)


BASE_MEAN_MOMENTUM = 0.01  # SimpleShot's base-class mean: each training batch's share of the running mean


@dataclass
class FinetuneSettings(AlgoSettings):
    """Pretrain a classifier on all meta-train classes; fit a new head on each support set."""

    outer_lr: float = 1e-3  # Adam step size of the pretraining
    batch_size: int = 16  # images per pretraining step
    classifier: Classifier = Classifier.linear  # the pretraining head: linear, or cosine (Baseline++)
    cosine_scale: float | None = None  # s of a cosine head; null: 2 up to 200 classes, 10 above (the authors' code)
    test_head: TestHead | None = None  # null: the classifier's kind; or simpleshot
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
        if self.cosine_scale is not None:
            positive(self, "cosine_scale")


def cosine_logits(features: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    """s cos(w_c, x): [..., items, classes] from features [..., items, d] and class weights [..., classes, d]."""
    return scale * F.normalize(features, dim=-1) @ F.normalize(weight, dim=-1).transpose(-1, -2)


def cosine_scale(classes: int, given: float | None) -> float:
    """Baseline++'s scale: the authors' code takes 2 for up to 200 classes and 10 for more."""
    return given if given is not None else (2.0 if classes <= 200 else 10.0)


def simpleshot_logits(support, support_labels, query, ways: int, base_mean: torch.Tensor) -> torch.Tensor:
    """Negative squared distances [T, queries, ways] of the centred, L2-normalised query embeddings to the
    class centroids of the centred, L2-normalised support embeddings (SimpleShot's CL2N)."""
    support = F.normalize(support - base_mean, dim=-1)
    query = F.normalize(query - base_mean, dim=-1)
    one_hot = F.one_hot(support_labels, ways).to(support.dtype)  # [T, support, ways]
    centroids = one_hot.transpose(1, 2) @ support / one_hot.sum(dim=1)[..., None]  # [T, ways, d]
    return -torch.cdist(query, centroids).pow(2)


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
        classifier: str = "linear",
        cosine_scale: float | None = None,
        test_head: str | None = None,
        workers: int = 1,
        ranks: Ranks = SINGLE,
        fast_paths: FastPaths = PLAIN,
    ):
        super().__init__(model, ranks, fast_paths)
        self._threads = TaskThreads(model, workers)  # evaluation embeds a task per core at once
        self.classifier = Classifier(getattr(classifier, "value", classifier))
        self.test_head = TestHead(getattr(test_head, "value", test_head) or self.classifier.value)
        self.cosine_scale = cosine_scale
        # sized by the first training batch's embeddings; zero (no centring) before any
        self.base_mean = torch.zeros(int(getattr(model, "feature_size", 0)), device=next(model.parameters()).device)
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
            features = self.model.features(batch.images)
            logits = self.classify(features)
            loss = self.loss(logits, batch)
        batch_statistics.commit(self.model, self.ranks)
        self.note_base_mean(features.detach())
        loss.backward()
        self.ranks.average_gradients(self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        accuracy = (logits.argmax(dim=-1) == batch.labels).float().mean()
        return {"loss": loss.item(), "accuracy": accuracy.item()}

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """The pretraining logits over all training classes: the model's linear head, or cosine (Baseline++)."""
        if self.classifier is Classifier.linear:
            return self.model.head(features)
        weight = self.model.head.weight
        return cosine_logits(features, weight, cosine_scale(weight.shape[0], self.cosine_scale))

    def note_base_mean(self, features: torch.Tensor) -> None:
        """SimpleShot's mean of the training classes' embeddings, a running mean over the training batches
        (averaged over the run's processes, so K processes keep the mean one would)."""
        batch_mean = features.float().mean(dim=0)
        self.ranks.average([batch_mean])
        if self.base_mean.shape != batch_mean.shape:
            self.base_mean = torch.zeros_like(batch_mean)
        self.base_mean = self.base_mean.to(batch_mean.device)
        self.base_mean.lerp_(batch_mean, BASE_MEAN_MOMENTUM)

    def head_logits(self, weight: torch.Tensor, bias: torch.Tensor, features: torch.Tensor, ways: int):
        """A fitted test-time head's logits [T, items, ways]: linear, or cosine (Baseline++)."""
        if self.test_head is TestHead.cosine:
            return cosine_logits(features, weight, cosine_scale(ways, self.cosine_scale))
        return torch.baddbmm(bias[:, None, :], features, weight.transpose(1, 2))

    def fit_heads(self, support: torch.Tensor, labels: torch.Tensor, ways: int):
        """Heads (weight [T, ways, dim], bias [T, ways]) fitted on each task's support embeddings: linear heads
        from zero; cosine heads from the class means (a zero weight has no direction)."""
        weight = support.new_zeros(support.shape[0], ways, support.shape[-1])
        if self.test_head is TestHead.cosine:
            weight = F.one_hot(labels, ways).to(support.dtype).transpose(1, 2) @ support
        weight.requires_grad_()
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
                logits = self.head_logits(weight, bias, support, ways)
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
        if self.test_head is TestHead.simpleshot:
            base_mean = self.base_mean.to(support.device, support.dtype)
            return simpleshot_logits(support, episodes.support_labels, query, episodes.ways, base_mean)
        weight, bias = self.fit_heads(support, episodes.support_labels, episodes.ways)
        return self.head_logits(weight, bias, query, episodes.ways)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "base_mean": self.base_mean.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        load_model_state(self.model, state["model"], "The checkpoint")
        if "base_mean" in state:
            self.base_mean = state["base_mean"].to(self.base_mean.device, self.base_mean.dtype).clone()
        elif self.test_head is TestHead.simpleshot:
            raise MetalearnError(
                "algo.test_head=simpleshot centres embeddings on the training classes' mean, which this checkpoint "
                "does not hold (it was written before it was kept): evaluate it with algo.test_head=linear, or "
                "train the run again."
            )
        if "optimizer" in state:  # an exported model has the weights only (see storage.checkpoint.TRAINING_STATE)
            load_optimizer(self.optimizer, state)


def load_teacher(run: SavedRun, num_classes: int, images: torch.Tensor, fast: FastPaths):
    """A finished finetune/distill run's network (frozen), and its logits with its own classifier (linear or
    cosine) as a function of images, for its soft targets.

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
    teacher.train(teacher.batch_norm != BatchNormMode.inductive.value).requires_grad_(False)
    settings = ckpt["config"]["algo"]
    if settings.get("classifier", Classifier.linear.value) != Classifier.cosine.value:
        return teacher, teacher
    scale = cosine_scale(num_classes, settings.get("cosine_scale"))
    return teacher, lambda x: cosine_logits(teacher.features(x), teacher.head.weight, scale)


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
        teacher, teacher_logits = self._teacher
        with torch.no_grad(), across_ranks(teacher, self.ranks):
            soft_targets = F.log_softmax(teacher_logits(batch.images) / self.temperature, dim=-1)
        soft = (
            F.kl_div(
                F.log_softmax(logits / self.temperature, dim=-1), soft_targets, log_target=True, reduction="batchmean"
            )
            * self.temperature**2
        )
        return (1 - self.distill_weight) * F.cross_entropy(logits, batch.labels) + self.distill_weight * soft
