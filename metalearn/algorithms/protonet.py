"""Prototypical Networks (Snell, Swersky & Zemel 2017).

A task's support images are embedded and averaged per class into prototypes;
a query's logits are its negative squared Euclidean distances to them. The
network is trained end to end on the query cross-entropy, with training
episodes that may have more classes than the evaluated tasks (the paper
trains Omniglot with 60). Each task's support and query images go through
the network as one batch, so batch norm sees the task (transductive, like
MAML's; see docs/algorithms.md), or with model.bn=inductive, as the paper's
code, BatchNorm keeps running statistics that normalise at test time.
"""

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from metalearn.algorithms.base import EMBEDDING, Algorithm, AlgoSettings, load_model_state, load_optimizer
from metalearn.algorithms.batching import (
    Params,
    TaskThreads,
    VectorizedSettings,
    detached_params,
    model_device,
    over_tasks,
    resolve_vectorize,
)
from metalearn.config.settings import at_least, positive
from metalearn.data import Episodes
from metalearn.device import PLAIN, FastPaths
from metalearn.distributed import SINGLE, Ranks
from metalearn.models import VMAP, set_layout
from metalearn.models.batch_stats import statistics_pass


@dataclass
class ProtoNetSettings(AlgoSettings, VectorizedSettings):
    outer_lr: float = 1e-3  # Adam step size
    lr_decay: float = 0.5  # the outer learning rate is multiplied by this ...
    lr_decay_every: int = 2000  # ... every this many steps

    def __post_init__(self):
        positive(self, "outer_lr")
        positive(self, "lr_decay")
        at_least(self, "lr_decay_every", 1)


def prototype_logits(
    support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor, ways: int
) -> torch.Tensor:
    """Negative squared distances [queries, ways] from query embeddings to the class means of the support."""
    # [support, ways]; a comparison, as F.one_hot's range check reads the labels and fails under vmap.
    one_hot = (support_labels[:, None] == torch.arange(ways, device=support.device)).to(support.dtype)
    prototypes = (one_hot.T @ support) / one_hot.sum(dim=0)[:, None]
    return -(query[:, None, :] - prototypes[None, :, :]).pow(2).sum(dim=-1)


class ProtoNet(Algorithm):
    Settings = ProtoNetSettings
    head = EMBEDDING

    def __init__(
        self,
        model: torch.nn.Module,
        outer_lr: float,
        lr_decay: float,
        lr_decay_every: int,
        vectorize: bool | str,
        workers: int = 1,
        ranks: Ranks = SINGLE,
        fast_paths: FastPaths = PLAIN,
    ):
        vectorize = resolve_vectorize(vectorize, model_device(model))
        super().__init__(model, ranks, fast_paths)
        self.outer_lr, self.lr_decay, self.lr_decay_every = outer_lr, lr_decay, lr_decay_every
        self.vectorize = vectorize
        if vectorize:
            set_layout(model, VMAP)
        # Evaluation scores a task per core at once on a CPU.
        self._threads = TaskThreads(model, 1 if vectorize else workers)

    @cached_property
    def optimizer(self) -> torch.optim.Optimizer:  # built at first use (see Algorithm)
        return torch.optim.Adam(self.model.parameters(), lr=self.outer_lr)

    @cached_property
    def scheduler(self):
        return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=self.lr_decay_every, gamma=self.lr_decay)

    def _logits(self, params: Params, sx, sy, qx, ways: int, model=None) -> torch.Tensor:
        embedded = functional_call(self.model if model is None else model, params, (torch.cat([sx, qx]),))
        return prototype_logits(embedded[: sx.shape[0]], sy, embedded[sx.shape[0] :], ways)

    def _task_loss(self, params: Params, sx, sy, qx, qy, ways: int):
        logits = self._logits(params, sx, sy, qx, ways)
        loss = F.cross_entropy(logits, qy)
        return loss, (loss.detach(), (logits.argmax(dim=-1) == qy).float().mean())

    def meta_train_step(self, episodes: Episodes) -> dict[str, float]:
        scheduler = self.scheduler  # built before the optimizer's first step, as torch expects
        self.model.train()
        ways = episodes.ways
        task_grad = grad(lambda p, sx, sy, qx, qy: self._task_loss(p, sx, sy, qx, qy, ways), has_aux=True)
        grads, (losses, accuracies) = over_tasks(task_grad, self.vectorize)(detached_params(self.model), *episodes)
        # model.bn=inductive: the batch statistics of the same passes, under the same weights
        statistics_pass(
            self.model,
            [torch.cat([sx, qx]) for sx, qx in zip(episodes.support, episodes.query, strict=False)],
            self.ranks,
        )
        for name, p in self.model.named_parameters():
            p.grad = grads[name].mean(dim=0)
        self.ranks.average_gradients(self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        return {"loss": losses.mean().item(), "accuracy": accuracies.mean().item()}

    @torch.no_grad()
    def predict(self, episodes: Episodes) -> torch.Tensor:
        self.model.eval()
        ways = episodes.ways
        if self.vectorize:
            logits = over_tasks(lambda p, sx, sy, qx: self._logits(p, sx, sy, qx, ways), True)
        else:

            def task_logits(model, params, sx, sy, qx):
                with torch.no_grad():  # in the worker thread
                    return self._logits(params, sx, sy, qx, ways, model)

            logits = self._threads.over_tasks(task_logits)
        return logits(detached_params(self.model), episodes.support, episodes.support_labels, episodes.query)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        load_model_state(self.model, state["model"], "The checkpoint")
        if "optimizer" in state:  # an exported model has the weights only (see storage.checkpoint.TRAINING_STATE)
            load_optimizer(self.optimizer, state, self.scheduler)
