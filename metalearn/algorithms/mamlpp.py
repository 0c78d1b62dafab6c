"""MAML++ (Antoniou, Edwards & Storkey 2019, "How to train your MAML"): second-order MAML with the
paper's five changes, each a setting of its own so that it can be switched off and ablated:

- MSL, `multi_step_loss`: the outer loss is the query loss after every inner
  step, weighted; the weights start equal and anneal over `msl_epochs`
  towards the last step's (the reference code's schedule, `msl_weights`).
  After `msl_epochs`, or switched off, only the last step's loss counts.
- DA, `first_order_epochs`: first-order meta-gradients for that many epochs,
  then second order.
- BNRS + BNWB, `per_step_bn_stats` / `per_step_bn_weights`: each BatchNorm
  layer keeps running statistics and a scale and shift per inner step
  (metalearn.models.step_norm). Running statistics exist with
  model.bn=inductive only: MAML++'s code computes them but normalises with
  the batch's statistics at test time too.
- LSLR, `learn_inner_lr`: one learned inner learning rate per layer (weight
  tensor) and per step, starting at `inner_lr`.
- CA, `cosine_annealing`: the outer learning rate follows a cosine from
  `outer_lr` to `min_outer_lr` over the run's train.steps.

BatchNorm's scale and shift, per step or shared, are meta-learned only and
never adapted in the inner loop, as in the reference code (its
enable_inner_loop_optimizable_bn_params is false in every configuration), so
switching BNWB off changes that one thing. An epoch is `epoch_steps`
meta-iterations (500 in the reference code). With every switch off it
computes the meta-gradient of MAML whose inner loop leaves BatchNorm's scale
and shift alone (a test pins this).
Tasks run one after another (on CPU worker threads): the per-step running
statistics are updates that a vmap cannot batch.
"""

import collections
import math
from contextlib import nullcontext
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from metalearn.algorithms.base import AlgoSettings
from metalearn.algorithms.batching import Params
from metalearn.algorithms.maml import MAML, InnerLoss
from metalearn.config.settings import at_least, positive
from metalearn.device import PLAIN, FastPaths
from metalearn.distributed import SINGLE, Ranks
from metalearn.errors import MetalearnError
from metalearn.models import in_nchw
from metalearn.models.batch_stats import recording_paused
from metalearn.models.step_norm import norm_parameter_names, per_step_norms, set_norm_step


@dataclass
class MAMLPlusPlusSettings(AlgoSettings):
    """MAML++: MAML's settings, and the paper's five changes, each a switch."""

    outer_lr: float = 1e-3  # Adam step size of the outer update (the start of the cosine with cosine_annealing)
    inner_lr: float = 0.1  # inner step size (with learn_inner_lr: the learned rates' start)
    inner_steps: int = 5  # inner steps in meta-training
    inner_steps_eval: int = 5  # inner steps at validation and test time
    inner_loss: InnerLoss = InnerLoss.mean  # the support loss the inner steps descend
    first_order: bool = False  # first order throughout (DA's first-order phase forever)
    checkpoint_inner: bool = False  # second order: recompute each inner step's activations in the backward pass
    epoch_steps: int = 500  # meta-iterations per epoch, the unit of msl_epochs and first_order_epochs
    multi_step_loss: bool = True  # MSL: the weighted query losses of every inner step
    msl_epochs: int = 10  # MSL: epochs over which the per-step weights anneal to the last step
    first_order_epochs: int = 0  # DA: epochs of first-order meta-gradients before second order
    per_step_bn_stats: bool = True  # BNRS: running statistics per inner step (with model.bn=inductive)
    per_step_bn_weights: bool = True  # BNWB: BatchNorm scale and shift per inner step
    learn_inner_lr: bool = True  # LSLR: a learned inner rate per weight tensor and per step
    cosine_annealing: bool = True  # CA: the outer rate from outer_lr to min_outer_lr over train.steps
    min_outer_lr: float = 1e-5  # CA: the outer rate at the end of the run
    anneal_steps: int | None = None  # CA: the cosine's length in steps (null: the run's train.steps)

    def __post_init__(self):
        positive(self, "outer_lr")
        positive(self, "inner_lr")
        positive(self, "min_outer_lr")
        at_least(self, "inner_steps", 1)
        at_least(self, "inner_steps_eval", 1)
        at_least(self, "epoch_steps", 1)
        at_least(self, "msl_epochs", 1)
        at_least(self, "first_order_epochs", 0)
        if self.anneal_steps is not None:
            at_least(self, "anneal_steps", 1)


def msl_weights(steps: int, epoch: int, msl_epochs: int) -> list[float]:
    """The per-step weights of the multi-step loss at `epoch` (the reference code's
    get_per_step_loss_importance_vector): equal at first; each non-final weight falls linearly to
    0.03 / steps over msl_epochs, the final one rises to take what they give up."""
    decay = 1.0 / steps / msl_epochs
    floor = 0.03 / steps
    weights = [max(1.0 / steps - epoch * decay, floor) for _ in range(steps - 1)]
    weights.append(min(1.0 / steps + epoch * (steps - 1) * decay, 1.0 - (steps - 1) * floor))
    return weights


class MAMLPlusPlus(MAML):
    Settings = MAMLPlusPlusSettings

    @classmethod
    def bf16_caveat(cls, settings) -> str | None:
        # bench.py fidelity (docs/performance.md): with learned per-step rates, bf16 moves MAML++'s meta-gradient
        # (the rates' most) further from float64's than rounding the weights does; without them it is MAML's.
        if settings.learn_inner_lr:
            return "float32, as bf16 moves MAML++'s meta-gradient (learned per-step rates) beyond weight rounding"
        return None

    def __init__(
        self,
        model: torch.nn.Module,
        outer_lr: float,
        inner_lr: float,
        inner_steps: int,
        inner_steps_eval: int,
        inner_loss: str,
        first_order: bool,
        checkpoint_inner: bool,
        epoch_steps: int,
        multi_step_loss: bool,
        msl_epochs: int,
        first_order_epochs: int,
        per_step_bn_stats: bool,
        per_step_bn_weights: bool,
        learn_inner_lr: bool,
        cosine_annealing: bool,
        min_outer_lr: float,
        anneal_steps: int | None = None,
        train_steps: int = 1,
        workers: int = 1,
        ranks: Ranks = SINGLE,
        fast_paths: FastPaths = PLAIN,
    ):
        if per_step_bn_stats or per_step_bn_weights:
            per_step_norms(model, inner_steps, per_step_bn_weights, per_step_bn_stats)
        super().__init__(
            model,
            inner_lr=inner_lr,
            inner_steps=inner_steps,
            inner_steps_eval=inner_steps_eval,
            outer_lr=outer_lr,
            first_order=False,  # the order is chosen per step (DA); the task function is ours
            vectorize="loop",
            workers=workers,
            inner_loss=inner_loss,
            checkpoint_inner=checkpoint_inner,
            ranks=ranks,
            fast_paths=fast_paths,
        )
        self.always_first_order = first_order
        self.epoch_steps, self.msl_epochs, self.first_order_epochs = epoch_steps, msl_epochs, first_order_epochs
        self.multi_step_loss, self.cosine_annealing = multi_step_loss, cosine_annealing
        self.outer_lr, self.min_outer_lr = outer_lr, min_outer_lr
        self.requested_anneal_steps = anneal_steps
        self.anneal_steps = anneal_steps or train_steps  # the cosine's length, fixed when the run starts
        self.step = 0
        norms = norm_parameter_names(model)  # meta-learned only, never adapted in the inner loop (the reference code)
        self.adapted_names = [n for n in self.adapted_names if n not in norms]
        self.learn_inner_lr = learn_inner_lr
        self.rates = {
            name: torch.full((inner_steps,), float(inner_lr), device=p.device, dtype=p.dtype)
            for name, p in model.named_parameters()
            if name in self.adapted_names and learn_inner_lr
        }
        for rate in self.rates.values():
            rate.requires_grad_()

    # --- the schedules -------------------------------------------------------------
    @property
    def epoch(self) -> int:
        return self.step // self.epoch_steps

    def second_order(self) -> bool:
        """DA: first order for the first first_order_epochs epochs."""
        return not self.always_first_order and self.epoch >= self.first_order_epochs

    def step_weights(self) -> list[float]:
        """The outer loss's weight of each inner step's query loss now (MSL, or the last step alone)."""
        if self.multi_step_loss and self.epoch < self.msl_epochs:
            return msl_weights(self.inner_steps, self.epoch, self.msl_epochs)
        return [0.0] * (self.inner_steps - 1) + [1.0]

    def outer_lr_now(self) -> float:
        if not self.cosine_annealing:
            return self.outer_lr
        done = min(self.step / max(self.anneal_steps, 1), 1.0)
        return self.min_outer_lr + (self.outer_lr - self.min_outer_lr) * (1 + math.cos(math.pi * done)) / 2

    @cached_property
    def optimizer(self) -> torch.optim.Optimizer:  # built at first use (see Algorithm)
        return torch.optim.Adam([*self.model.parameters(), *self.rates.values()], lr=self.outer_lr_now())

    def _set_outer_lr(self) -> None:
        if "optimizer" not in self.__dict__:
            return  # not built yet: it starts at outer_lr_now()
        for group in self.optimizer.param_groups:
            group["lr"] = self.outer_lr_now()

    def _rate(self, rates: Params, name: str, step: int):
        return rates[name][min(step, self.inner_steps - 1)] if name in rates else self.inner_lr

    # --- one task, in plain autograd ----------------------------------------------------
    def _inner_steps(self, model, params: Params, rates: Params, sx, sy, steps: int, second_order: bool):
        """The adapted weights after each of `steps` inner steps, passes at step k on BatchNorm's step k."""
        names = list(self.adapted_names)

        def inner_step(k, *values):
            set_norm_step(model, k)
            logits = functional_call(model, {**params, **dict(zip(names, values, strict=False))}, (sx,))
            g = torch.autograd.grad(self._inner_loss(logits, sy), values, create_graph=second_order)
            # First order: the gradient is a constant, yet the weights stay a function of the
            # initialisation (the identity path) and of the learned rates, as in the reference code.
            return tuple(p - self._rate(rates, name, k) * gi for name, p, gi in zip(names, values, g, strict=False))

        adapted = tuple(params[name] for name in names)
        for k in range(steps):
            if second_order and self.checkpoint_inner:
                adapted = checkpoint(
                    inner_step,
                    k,
                    *adapted,
                    use_reentrant=False,
                    context_fn=lambda: (nullcontext(), recording_paused(model)),
                )
            else:
                adapted = inner_step(k, *adapted)
            yield k, {**params, **dict(zip(names, adapted, strict=False))}

    def _task_autograd(self, model: torch.nn.Module, leaves, sx, sy, qx, qy):
        params, rates = leaves["params"], leaves["rates"]
        second_order = self.second_order()
        weights = self.step_weights()
        loss = 0.0
        with in_nchw(model) if second_order else nullcontext():
            for k, adapted in self._inner_steps(model, params, rates, sx, sy, self.inner_steps, second_order):
                if weights[k] == 0:
                    continue
                set_norm_step(model, k)  # the query after step k: BatchNorm's step k (the reference code)
                logits = functional_call(model, adapted, (qx,))
                loss = loss + weights[k] * F.cross_entropy(logits, qy)
        accuracy = (logits.argmax(dim=-1) == qy).float().mean()  # after the last step
        flat = [t for part in leaves.values() for t in part.values()]
        g = iter(torch.autograd.grad(loss, flat, allow_unused=True))
        grads = {group: {name: _or_zeros(next(g), t) for name, t in part.items()} for group, part in leaves.items()}
        return grads, loss.detach(), accuracy  # the objective it descends: the weighted losses of the steps

    def _predict_looped(self, meta, sx, sy, qx) -> torch.Tensor:
        params = {name: t.detach().requires_grad_() for name, t in meta["params"].items()}
        steps = self.inner_steps_eval

        def task_logits(model, rates, support, labels, query):
            with torch.enable_grad():  # grad mode is per thread: set it here, in the worker
                steps_taken = self._inner_steps(model, params, rates, support, labels, steps, False)
                _, adapted = collections.deque(steps_taken, maxlen=1)[0]  # the last step's weights
            adapted = {name: t.detach() for name, t in adapted.items()}
            with torch.no_grad():
                set_norm_step(model, steps - 1)
                return functional_call(model, adapted, (query,))

        return self._threads.over_tasks(task_logits)(meta["rates"], sx, sy, qx)

    # --- the algorithm interface ----------------------------------------------------------
    def meta_train_step(self, episodes) -> dict[str, float]:
        self._set_outer_lr()
        result = super().meta_train_step(episodes)
        self.step += 1
        return result

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["step"] = self.step
        state["anneal_steps"] = self.anneal_steps
        return state

    def load_state_dict(self, state: dict) -> None:
        self._load_weights_and_rates(state, "algo.learn_inner_lr")
        self.step = int(state.get("step", 0))
        if self.requested_anneal_steps is None:  # the run's own schedule goes on
            self.anneal_steps = int(state.get("anneal_steps", self.anneal_steps))
        if "optimizer" in state:  # an exported model has the weights only
            self.optimizer.load_state_dict(state["optimizer"])
        self._set_outer_lr()

    def check_resume(self, train_steps: int) -> None:
        if self.cosine_annealing and train_steps > self.anneal_steps:
            raise MetalearnError(
                f"algo=mamlpp anneals its outer learning rate to algo.min_outer_lr={self.min_outer_lr:g} over this "
                f"run's {self.anneal_steps} steps (fixed when the run started), so it cannot train to "
                f"train.steps={train_steps} on that schedule: resume with algo.anneal_steps={train_steps} (the cosine "
                f"stretches from here), or with algo.cosine_annealing=false to go on at a constant rate."
            )


def _or_zeros(grad, like: torch.Tensor) -> torch.Tensor:
    """A weight the loss does not reach (a step's BatchNorm entries with MSL off) gets a zero gradient."""
    return torch.zeros_like(like) if grad is None else grad
