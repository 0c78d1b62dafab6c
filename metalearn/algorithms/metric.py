"""Metric-based few-shot learners: one network embeds a task's support and query images, and a head with no
per-task weights to train turns them into query logits (ProtoNet's prototypes, Matching Networks' attention,
R2D2's closed-form ridge regression). The network and the head's own learned scalars are trained end to end
on the query loss, task by task (threads on a CPU, vmap on a GPU), with Adam and a step decay of its rate.

Each task's support and query images go through the network as one batch, so batch norm sees the task
(transductive), or with model.bn=inductive, BatchNorm keeps running statistics that normalise at test time.
A subclass gives `head_logits` and, where its head learns something (R2-D2's scalars, a relation module's
weights), `initial_head`; `query_loss` is the query cross-entropy unless the method says otherwise.
"""

from abc import abstractmethod
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
from metalearn.errors import MetalearnError
from metalearn.models import VMAP, set_layout
from metalearn.models.batch_stats import statistics_pass


@dataclass
class MetricSettings(AlgoSettings, VectorizedSettings):
    outer_lr: float = 1e-3  # Adam step size
    lr_decay: float = 0.5  # the outer learning rate is multiplied by this ...
    lr_decay_every: int = 2000  # ... every this many steps

    def __post_init__(self):
        positive(self, "outer_lr")
        positive(self, "lr_decay")
        at_least(self, "lr_decay_every", 1)


def class_one_hot(labels: torch.Tensor, ways: int, dtype: torch.dtype) -> torch.Tensor:
    """[items, ways]; a comparison, as F.one_hot's range check reads the labels and fails under vmap."""
    return (labels[:, None] == torch.arange(ways, device=labels.device)).to(dtype)


class MetricLearner(Algorithm):
    Settings = MetricSettings
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
        **head_settings,
    ):
        """`head_settings`: the keys a subclass's Settings adds (its head's), for its `initial_head`."""
        vectorize = resolve_vectorize(vectorize, model_device(model))
        super().__init__(model, ranks, fast_paths)
        self.head_settings = head_settings
        self.outer_lr, self.lr_decay, self.lr_decay_every = outer_lr, lr_decay, lr_decay_every
        self.vectorize = vectorize
        if vectorize:
            set_layout(model, VMAP)
        # Evaluation scores a task per core at once on a CPU.
        self._threads = TaskThreads(model, 1 if vectorize else workers)
        parameter = next(model.parameters())
        self.head_params = {
            name: torch.as_tensor(value, dtype=parameter.dtype, device=parameter.device).detach().requires_grad_()
            for name, value in self.initial_head(self.embedding_size(model)).items()
        }

    @staticmethod
    def embedding_size(model: torch.nn.Module) -> int:
        return int(getattr(model, "feature_size", 0))

    def initial_head(self, embedding_size: int) -> dict[str, float | torch.Tensor]:
        """The head's learned values (scalars or tensors) as they start; none for a head that learns nothing."""
        return {}

    @abstractmethod
    def head_logits(self, head: Params, support, support_labels, query, ways: int) -> torch.Tensor:
        """Query logits [queries, ways] from the embeddings of one task's support and query images."""

    def query_loss(self, logits: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
        return F.cross_entropy(logits, labels)

    @cached_property
    def optimizer(self) -> torch.optim.Optimizer:  # built at first use (see Algorithm)
        return torch.optim.Adam([*self.model.parameters(), *self.head_params.values()], lr=self.outer_lr)

    @cached_property
    def scheduler(self):
        return torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=self.lr_decay_every, gamma=self.lr_decay)

    def _params(self) -> dict:
        return {"model": detached_params(self.model), "head": {k: v.detach() for k, v in self.head_params.items()}}

    def _logits(self, params: dict, sx, sy, qx, ways: int, model=None) -> torch.Tensor:
        embedded = functional_call(self.model if model is None else model, params["model"], (torch.cat([sx, qx]),))
        return self.head_logits(params["head"], embedded[: sx.shape[0]], sy, embedded[sx.shape[0] :], ways)

    def _task_loss(self, params: dict, sx, sy, qx, qy, ways: int):
        logits = self._logits(params, sx, sy, qx, ways)
        loss = self.query_loss(logits, qy, ways)
        return loss, (loss.detach(), (logits.argmax(dim=-1) == qy).float().mean())

    def meta_train_step(self, episodes: Episodes) -> dict[str, float]:
        scheduler = self.scheduler  # built before the optimizer's first step, as torch expects
        self.model.train()
        ways = episodes.ways
        task_grad = grad(lambda p, sx, sy, qx, qy: self._task_loss(p, sx, sy, qx, qy, ways), has_aux=True)
        grads, (losses, accuracies) = over_tasks(task_grad, self.vectorize)(self._params(), *episodes)
        # model.bn=inductive: the batch statistics of the same passes, under the same weights
        statistics_pass(
            self.model,
            [torch.cat([sx, qx]) for sx, qx in zip(episodes.support, episodes.query, strict=False)],
            self.ranks,
        )
        for name, p in self.model.named_parameters():
            p.grad = grads["model"][name].mean(dim=0)
        for name, p in self.head_params.items():
            p.grad = grads["head"][name].mean(dim=0)
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
        return logits(self._params(), episodes.support, episodes.support_labels, episodes.query)

    def state_dict(self) -> dict:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }
        if self.head_params:
            state["head"] = {name: p.detach().clone() for name, p in self.head_params.items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        load_model_state(self.model, state["model"], "The checkpoint")
        if self.head_params:
            saved = state.get("head")
            if not isinstance(saved, dict) or set(saved) != set(self.head_params):
                raise MetalearnError(
                    f"The checkpoint has no learned head ({', '.join(self.head_params)}) of this algorithm: it was "
                    f"written by another algorithm."
                )
            with torch.no_grad():
                for name, p in self.head_params.items():
                    p.copy_(saved[name])
        if "optimizer" in state:  # an exported model has the weights only (see storage.checkpoint.TRAINING_STATE)
            load_optimizer(self.optimizer, state, self.scheduler)
