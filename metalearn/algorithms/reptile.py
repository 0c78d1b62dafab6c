"""Reptile (Nichol, Achiam & Schulman 2018, "On First-Order Meta-Learning Algorithms").

Each task adapts a copy of the weights with `inner_steps` minibatch steps
(Adam with beta1 = 0, as in the paper's code, or SGD) on its training images;
the outer update moves the weights toward the tasks' adapted weights:
theta <- theta + eps * (mean_i phi_i - theta), with eps annealed linearly from
`meta_step` to `meta_step_final` over `anneal_steps` steps (train.steps when
the run starts, saved in its checkpoints: resuming with a larger
train.steps keeps the schedule). The per-task adaptation is one
pure torch.func function vmapped over the meta-batch (`vectorize=vmap`, a
GPU's default), or the same operations in plain autograd, a task per core
on the task threads (`loop`, a CPU's). Evaluation fine-tunes on the support
set the same way (`inner_steps_eval`).

One difference from the paper's code: the inner Adam state starts afresh for
every task (there it carries over from task to task), which keeps the
per-task function pure and the tasks of a meta-batch independent.
"""

import logging
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from metalearn.algorithms.base import Algorithm, AlgoSettings, load_model_state
from metalearn.algorithms.batching import (
    Params,
    TaskThreads,
    VectorizedSettings,
    detached_params,
    model_device,
    over_tasks,
    resolve_vectorize,
)
from metalearn.config.settings import at_least, finite, positive
from metalearn.data import Episodes, EpisodeSampler
from metalearn.device import PLAIN, FastPaths
from metalearn.distributed import SINGLE, Ranks
from metalearn.errors import MetalearnError
from metalearn.models import VMAP, set_layout
from metalearn.models.batch_stats import statistics_pass

log = logging.getLogger(__name__)

ADAM_BETA2, ADAM_EPS = 0.999, 1e-8


class InnerOptimizer(Enum):
    sgd = "sgd"
    adam = "adam"


@dataclass
class ReptileSettings(AlgoSettings, VectorizedSettings):
    inner_lr: float = 1e-3  # inner step size (Adam with beta1 = 0, or SGD)
    inner_steps: int = 5  # inner minibatch steps per task in meta-training
    inner_batch: int = 10  # images per inner step, drawn from the task without replacement
    inner_optimizer: InnerOptimizer = InnerOptimizer.adam  # adam (beta1 = 0, as the paper's code) or sgd
    inner_steps_eval: int = 50  # fine-tuning steps on a test task's support set
    inner_batch_eval: int = 5  # images per fine-tuning step
    meta_step: float = 1.0  # eps of the outer update theta += eps (mean adapted - theta), at the start ...
    meta_step_final: float = 0.0  # ... annealed linearly to this ...
    anneal_steps: int | None = None  # ... over this many steps (null: train.steps when the run starts, kept)

    def __post_init__(self):
        positive(self, "inner_lr")
        positive(self, "meta_step")
        finite(self, "meta_step_final")
        for key in ("inner_steps", "inner_batch", "inner_steps_eval", "inner_batch_eval"):
            at_least(self, key, 1)
        at_least(self, "anneal_steps", 1, optional=True)


class OrderedEpisodes(NamedTuple):
    """Training episodes with each task's inner minibatch order [T, steps*batch]."""

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    orders: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.support.shape[0]


class Reptile(Algorithm):
    Settings = ReptileSettings
    needs_queries = False

    def __init__(
        self,
        model: torch.nn.Module,
        inner_lr: float,
        inner_steps: int,
        inner_batch: int,
        inner_optimizer: str,
        inner_steps_eval: int,
        inner_batch_eval: int,
        meta_step: float,
        meta_step_final: float,
        anneal_steps: int | None,
        train_steps: int,
        vectorize: bool | str,
        workers: int = 1,
        ranks: Ranks = SINGLE,
        fast_paths: FastPaths = PLAIN,
    ):
        vectorize = resolve_vectorize(vectorize, model_device(model))
        super().__init__(model, ranks, fast_paths)
        self.inner_lr, self.inner_steps, self.inner_batch = inner_lr, inner_steps, inner_batch
        self.adam = InnerOptimizer(inner_optimizer) is InnerOptimizer.adam
        self.inner_steps_eval, self.inner_batch_eval = inner_steps_eval, inner_batch_eval
        self.meta_step, self.meta_step_final = meta_step, meta_step_final
        self.requested_anneal_steps = anneal_steps  # None: fixed when the run starts
        self.anneal_steps = anneal_steps or train_steps
        self.step = 0
        if vectorize:
            set_layout(model, VMAP)
            self._adapt_tasks = over_tasks(
                lambda params, x, y, order: self._adapt(params, x, y, order, self.inner_steps, self.inner_batch), True
            )
            self._predict = over_tasks(self._adapted_logits, True)
        else:  # a task per core at once, as MAML's loop (metalearn.algorithms.batching.TaskThreads)
            self._threads = TaskThreads(model, workers)
            self._adapt_tasks = self._threads.over_tasks(
                lambda model, params, x, y, order: self._adapt_autograd(
                    model, params, x, y, order, self.inner_steps, self.inner_batch
                )
            )
            self._predict = self._threads.over_tasks(self._adapted_logits_autograd)

    # --- pure per-task functions -------------------------------------------------
    def _loss(self, params: Params, x: torch.Tensor, y: torch.Tensor):
        logits = functional_call(self.model, params, (x,))
        loss = F.cross_entropy(logits, y)
        return loss, (loss.detach(), (logits.argmax(dim=-1) == y).float().mean())

    def _adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor, order: torch.Tensor, steps: int, batch: int):
        """`steps` minibatch steps, taking consecutive slices of `order` (the task's image indices)."""
        loss_grad = grad(self._loss, has_aux=True)
        second_moment = {name: torch.zeros_like(p) for name, p in params.items()}
        losses, accuracies = [], []
        for step in range(steps):
            picks = order[step * batch : (step + 1) * batch]
            g, (loss, accuracy) = loss_grad(params, x[picks], y[picks])
            losses.append(loss)
            accuracies.append(accuracy)
            if self.adam:  # beta1 = 0: the step is the gradient over a running RMS
                correction = 1 - ADAM_BETA2 ** (step + 1)
                second_moment = {n: ADAM_BETA2 * v + (1 - ADAM_BETA2) * g[n] ** 2 for n, v in second_moment.items()}
                params = {
                    n: p - self.inner_lr * g[n] / ((second_moment[n] / correction).sqrt() + ADAM_EPS)
                    for n, p in params.items()
                }
            else:
                params = {n: p - self.inner_lr * g[n] for n, p in params.items()}
        return params, (torch.stack(losses).mean(), torch.stack(accuracies).mean())

    def _adapted_logits(self, params: Params, sx, sy, qx, order):
        adapted, _ = self._adapt(params, sx, sy, order, self.inner_steps_eval, self.inner_batch_eval)
        return functional_call(self.model, adapted, (qx,))

    # --- the loop strategy: the same maths in plain autograd, a task per thread ------------
    def _adapt_autograd(self, model: torch.nn.Module, params: Params, x, y, order, steps: int, batch: int):
        """`_adapt` with torch.autograd and in-place multi-tensor updates: per task on a CPU about 1.7x as fast
        as the torch.func version, whose per-op overhead dominates at 5-10 images per step."""
        names = list(params)
        weights = [params[name].detach().clone().requires_grad_() for name in names]
        second_moment = [torch.zeros_like(w) for w in weights]
        losses, accuracies = [], []
        for step in range(steps):
            picks = order[step * batch : (step + 1) * batch]
            with torch.enable_grad():  # grad mode is per thread: set here, in the worker
                logits = functional_call(model, dict(zip(names, weights, strict=False)), (x[picks],))
                loss = F.cross_entropy(logits, y[picks])
                g = torch.autograd.grad(loss, weights)
            losses.append(loss.detach())
            accuracies.append((logits.detach().argmax(dim=-1) == y[picks]).float().mean())
            with torch.no_grad():
                if self.adam:  # beta1 = 0: the step is the gradient over a running RMS
                    # the operations of `_adapt` in its order, so both give the same bits
                    correction = 1 - ADAM_BETA2 ** (step + 1)
                    squares = torch._foreach_pow(g, 2)
                    torch._foreach_mul_(squares, 1 - ADAM_BETA2)
                    torch._foreach_mul_(second_moment, ADAM_BETA2)
                    torch._foreach_add_(second_moment, squares)
                    denominator = torch._foreach_div(second_moment, correction)
                    torch._foreach_sqrt_(denominator)
                    torch._foreach_add_(denominator, ADAM_EPS)
                    moves = torch._foreach_mul(g, self.inner_lr)
                    torch._foreach_div_(moves, denominator)
                    torch._foreach_sub_(weights, moves)
                else:
                    torch._foreach_sub_(weights, torch._foreach_mul(g, self.inner_lr))
        adapted = {name: w.detach() for name, w in zip(names, weights, strict=False)}
        return adapted, (torch.stack(losses).mean(), torch.stack(accuracies).mean())

    def _adapted_logits_autograd(self, model: torch.nn.Module, params: Params, sx, sy, qx, order):
        adapted, _ = self._adapt_autograd(model, params, sx, sy, order, self.inner_steps_eval, self.inner_batch_eval)
        with torch.no_grad():
            return functional_call(model, adapted, (qx,))

    # --- the algorithm interface -----------------------------------------------
    @staticmethod
    def _orders(num_tasks: int, size: int, steps: int, batch: int, device, generator=None) -> torch.Tensor:
        """Per task, the images of `steps` minibatches: fresh permutations, one after another, as the
        paper's code reshuffles the task's images after each pass (minibatches span the seams)."""
        passes = -(-steps * batch // size)
        keys = torch.rand(num_tasks, passes, size, generator=generator)
        return keys.argsort(dim=2).flatten(1)[:, : steps * batch].to(device)

    def outer_step_size(self) -> float:
        """eps for the next outer update: linear from meta_step to meta_step_final over anneal_steps."""
        done = min(self.step / self.anneal_steps, 1.0)
        return self.meta_step + (self.meta_step_final - self.meta_step) * done

    def sample(self, sampler: EpisodeSampler, meta_batch_size: int) -> "OrderedEpisodes":
        """The meta-batch with each task's minibatch order, drawn for the whole batch (from torch's RNG)
        so that a rank's slice of it is what one process would have drawn for those tasks."""
        episodes = sampler.sample(meta_batch_size)
        return OrderedEpisodes(*episodes, self._train_orders(episodes))

    def _train_orders(self, episodes: Episodes) -> torch.Tensor:
        return self._orders(
            episodes.num_tasks, episodes.support.shape[1], self.inner_steps, self.inner_batch, episodes.support.device
        )

    def adapted_weights(self, episodes: Episodes):
        """Each task's adapted weights [T, ...] from its support set, in the batch's minibatch orders
        (plain Episodes: orders drawn now)."""
        orders = episodes.orders if isinstance(episodes, OrderedEpisodes) else self._train_orders(episodes)
        return self._adapt_tasks(detached_params(self.model), episodes.support, episodes.support_labels, orders)

    @torch.no_grad()
    def meta_train_step(self, episodes: Episodes) -> dict[str, float]:
        self.model.train()
        adapted, (losses, accuracies) = self.adapted_weights(episodes)
        statistics_pass(self.model, list(episodes.support), self.ranks)  # model.bn=inductive: the tasks' statistics
        eps = self.outer_step_size()
        params = dict(self.model.named_parameters())
        moves = [adapted[name].mean(dim=0) - p for name, p in params.items()]
        self.ranks.average(moves)  # over the whole meta-batch when it is split across processes
        for p, move in zip(params.values(), moves, strict=False):
            p.add_(move, alpha=eps)
        self.step += 1
        return {"loss": losses.mean().item(), "accuracy": accuracies.mean().item()}

    @torch.no_grad()
    def predict(self, episodes: Episodes) -> torch.Tensor:
        self.model.eval()
        # Fine-tuning minibatches in one fixed order for every task, so evaluation does not touch the
        # training RNG and an episode's score does not depend on the batch (or the process) it is scored in.
        orders = self._orders(
            1,
            episodes.support.shape[1],
            self.inner_steps_eval,
            self.inner_batch_eval,
            episodes.support.device,
            torch.Generator().manual_seed(0),
        ).expand(episodes.num_tasks, -1)
        return self._predict(
            detached_params(self.model), episodes.support, episodes.support_labels, episodes.query, orders
        )

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "step": self.step, "anneal_steps": self.anneal_steps}

    def load_state_dict(self, state: dict) -> None:
        load_model_state(self.model, state["model"], "The checkpoint")
        self.step = int(state["step"])
        self.anneal_steps = int(state.get("anneal_steps", self.anneal_steps))
        saved = self.anneal_steps
        if self.requested_anneal_steps is None or self.requested_anneal_steps == saved:
            return
        before = self.outer_step_size()
        self.anneal_steps = self.requested_anneal_steps
        log.warning(
            "algo.anneal_steps=%d replaces the run's %d: at step %d the outer step size eps jumps from %.4g to %.4g",
            self.anneal_steps,
            saved,
            self.step,
            before,
            self.outer_step_size(),
        )

    def check_resume(self, train_steps: int) -> None:
        if train_steps <= self.anneal_steps or self.meta_step_final != 0:
            return
        stretched = self.meta_step * (1 - self.step / train_steps)
        raise MetalearnError(
            f"algo=reptile anneals its outer step size eps from {self.meta_step:g} to 0 over this run's first "
            f"{self.anneal_steps} steps (fixed when the run started), so steps past {self.anneal_steps} would "
            f"change nothing. To train to train.steps={train_steps}, resume with algo.anneal_steps={train_steps} "
            f"(the schedule stretches: eps jumps from {self.outer_step_size():.4g} to {stretched:.4g} at step "
            f"{self.step}), or with algo.meta_step_final=<eps above 0> to go on at that step size after step "
            f"{self.anneal_steps}."
        )
