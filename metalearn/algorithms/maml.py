"""The MAML family: MAML and first-order MAML (Finn, Abbeel & Levine 2017),
ANIL (Raghu et al. 2020) and Meta-SGD (Li et al. 2017).

A task's meta-gradient: adapt a copy of the weights on the support set with
`inner_steps` gradient steps, then differentiate the query loss. Second
order differentiates through the inner updates; first order takes the query
gradient at the adapted weights. ANIL adapts only the linear head (the
body's support features are computed once per task); Meta-SGD learns one
inner rate per adapted weight alongside the initialisation.

The meta-batch runs as one `vmap` of a pure torch.func task function (for
GPUs), or as a loop of the same maths in plain autograd, split over one
thread per core (for CPUs, where torch.func's transforms cost more per task
than they save and a small task cannot fill several cores). The tests pin
both against a naive autograd loop in float64. `vmap(grad(task))` is used
rather than `grad(mean(vmap(task)))`, which gives wrong second-order
gradients through the native batch norm in torch 2.14.
"""

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad
from torch.utils.checkpoint import checkpoint

from metalearn.algorithms.base import Algorithm, AlgoSettings, load_model_state, load_optimizer
from metalearn.algorithms.batching import (
    Params,
    TaskThreads,
    VectorizedSettings,
    detached_params,
    loop_only,
    model_device,
    over_tasks,
    resolve_vectorize,
    sub_params,
)
from metalearn.config.settings import SettingError, at_least, positive
from metalearn.data import Episodes
from metalearn.device import PLAIN, FastPaths
from metalearn.distributed import SINGLE, Ranks
from metalearn.errors import MetalearnError
from metalearn.models import VMAP, in_nchw, set_layout
from metalearn.models.batch_stats import has_running_stats, recording, recording_paused

# The meta-parameters: {"params": the initialisation, "rates": Meta-SGD's inner rates (else empty)}.
Meta = dict[str, Params]
RATE_PREFIX = "inner_lr."


class AdaptedParams(Enum):
    all = "all"  # MAML: the inner loop adapts every weight
    head = "head"  # ANIL: only the linear head; the body is reused as it is


class InnerLoss(Enum):
    mean = "mean"  # the mean cross-entropy over the support set
    # Finn et al.'s code: the sum over the support set of each example's loss divided by the shots,
    # i.e. ways x the mean, so the same inner_lr takes a ways-times larger step.
    sum_over_shots = "sum_over_shots"


@dataclass
class MAMLSettings(AlgoSettings, VectorizedSettings):
    """MAML, first-order MAML, ANIL (adapt=head) and Meta-SGD (learn_inner_lr)."""

    outer_lr: float = 1e-3  # Adam step size of the outer update
    inner_lr: float = 0.4  # inner step size (Meta-SGD: unused, the rates are learned)
    inner_steps: int = 1  # inner steps in meta-training
    inner_steps_eval: int = 10  # inner steps at validation and test time
    first_order: bool = False  # drop second derivatives through the inner loop (FOMAML)
    inner_loss: InnerLoss = InnerLoss.mean  # the support loss the inner steps descend
    adapt: AdaptedParams = AdaptedParams.all  # which weights the inner loop adapts
    learn_inner_lr: bool = False  # Meta-SGD: one learned inner rate per adapted weight
    inner_lr_init: list[float] = field(default_factory=lambda: [0.005, 0.1])  # Meta-SGD: initial rates, uniform
    # Second order: keep only each inner step's input and recompute its activations in the backward pass,
    # so memory grows with inner_steps by the adapted weights, not the activations (about twice the time
    # of a step on a CPU); the loop strategy only.
    checkpoint_inner: bool = False

    def __post_init__(self):
        positive(self, "outer_lr")
        positive(self, "inner_lr")
        at_least(self, "inner_steps", 1)
        at_least(self, "inner_steps_eval", 1)
        low_high_ok = len(self.inner_lr_init) == 2 and 0 <= self.inner_lr_init[0] <= self.inner_lr_init[1] < math.inf
        if not low_high_ok:
            raise SettingError(
                "inner_lr_init", f"must be [low, high] with 0 <= low <= high (got {self.inner_lr_init})."
            )


def checked_strategy(
    model: torch.nn.Module,
    vectorize: bool | str,
    head_only: bool,
    first_order: bool,
    learn_inner_lr: bool,
    checkpoint_inner: bool,
) -> bool:
    """The settings checked against each other and the model; True: the vmap strategy, False: the loop."""
    if head_only and not (hasattr(model, "features") and hasattr(model, "head")):
        raise MetalearnError("algo.adapt=head needs a model with `features` and `head` parts.")
    if learn_inner_lr and first_order:
        raise MetalearnError(
            "learned inner rates (Meta-SGD) get no gradient in first order: "
            "set algo.first_order=false or algo.learn_inner_lr=false."
        )
    if checkpoint_inner:
        vectorize = loop_only(
            vectorize,
            "algo.checkpoint_inner=true recomputes the inner steps in the backward pass (on a GPU the tasks "
            "then run one after another)",
        )
    if has_running_stats(model):
        vectorize = loop_only(
            vectorize,
            "model.bn=inductive folds each inner step's BatchNorm statistics into running averages",
        )
    return resolve_vectorize(vectorize, model_device(model))


def learned_rates(model: torch.nn.Module, adapted_names: list[str], inner_lr_init: Sequence[float]) -> Params:
    """Meta-SGD's inner rates: one per adapted weight, of its shape, drawn uniformly from [low, high]."""
    low, high = inner_lr_init
    return {
        name: torch.empty_like(p).uniform_(low, high).requires_grad_()
        for name, p in model.named_parameters()
        if name in adapted_names
    }


class MAML(Algorithm):
    Settings = MAMLSettings

    def __init__(
        self,
        model: torch.nn.Module,
        inner_lr: float,
        inner_steps: int,
        inner_steps_eval: int,
        outer_lr: float,
        first_order: bool,
        vectorize: bool | str,
        adapt: str = "all",
        learn_inner_lr: bool = False,
        inner_lr_init: Sequence[float] = (0.005, 0.1),
        workers: int = 1,
        inner_loss: str = "mean",
        checkpoint_inner: bool = False,
        ranks: Ranks = SINGLE,
        fast_paths: FastPaths = PLAIN,
    ):
        head_only = AdaptedParams(adapt) is AdaptedParams.head
        vectorize = checked_strategy(model, vectorize, head_only, first_order, learn_inner_lr, checkpoint_inner)
        self.checkpoint_inner = checkpoint_inner and not first_order
        super().__init__(model, ranks, fast_paths)
        # Else each inner step's freed activations stay resident and the peak grows with the steps anyway.
        self.flat_peak = self.checkpoint_inner
        self.ways = model.head.out_features
        self.sum_over_shots = InnerLoss(inner_loss) is InnerLoss.sum_over_shots
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.inner_steps_eval = inner_steps_eval
        self.head_only = head_only
        self.adapted_names = [n for n, _ in model.named_parameters() if not head_only or n.startswith("head.")]
        self.rates: Params = learned_rates(model, self.adapted_names, inner_lr_init) if learn_inner_lr else {}
        self.outer_lr = outer_lr
        self.first_order = first_order
        self._use_strategy(vectorize, workers)

    @classmethod
    def bf16_caveat(cls, settings) -> str | None:
        # Measured by `bench.py fidelity` (docs/performance.md): bf16 moves these meta-gradients further
        # from float64's than rounding the weights to bf16 does; every other MAML setting stays at that floor.
        if settings.learn_inner_lr:
            return "float32, as bf16 moves Meta-SGD's meta-gradient (learned rates) beyond weight rounding"
        if AdaptedParams(settings.adapt) is AdaptedParams.head and settings.inner_steps > 1:
            return (
                f"float32, as bf16 moves ANIL's meta-gradient over {settings.inner_steps} inner steps "
                "beyond weight rounding"
            )
        return None

    def _use_strategy(self, vectorize: bool, workers: int) -> None:
        """The meta-batch and prediction as one vmap, or as a loop over tasks on `workers` threads."""
        task_fn = self._first_order_task if self.first_order else self._second_order_task
        self._meta_grads = self._vmapped(over_tasks(task_fn, True)) if vectorize else self._looped
        if vectorize:
            set_layout(self.model, VMAP)
        else:
            # Each pass takes its memory format from its input (see in_nchw); with NCHW weights
            # the task threads measured 10-15% faster than with channels-last ones.
            self.model.to(memory_format=torch.contiguous_format)
        self._threads = TaskThreads(self.model, 1 if vectorize else workers)
        self._predict = over_tasks(self._adapted_logits, True) if vectorize else self._predict_looped

    @cached_property
    def optimizer(self) -> torch.optim.Optimizer:  # built at first use (see Algorithm)
        return torch.optim.Adam([*self.model.parameters(), *self.rates.values()], lr=self.outer_lr)

    # --- pure per-task functions -------------------------------------------------
    def _inner_loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The support-set loss the inner loop descends: the mean cross-entropy, or as Finn et al.'s
        code has it, the sum over the support set of each example's loss divided by the shots."""
        if self.sum_over_shots:
            return F.cross_entropy(logits, y, reduction="sum") / (y.shape[0] // self.ways)
        return F.cross_entropy(logits, y)

    def _loss(self, params: Params, x: torch.Tensor, y: torch.Tensor, model=None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(self.model if model is None else model, params, (x,))
        return F.cross_entropy(logits, y), logits

    def _adapt(self, meta: Meta, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
        params, rates = meta["params"], meta["rates"]
        if self.head_only:
            features = functional_call(self.model.features, sub_params(params, "features"), (x,))

            def inner_loss(adapted):
                return self._inner_loss(functional_call(self.model.head, sub_params(adapted, "head"), (features,)), y)
        else:

            def inner_loss(adapted):
                return self._inner_loss(functional_call(self.model, adapted, (x,)), y)

        adapted = {name: params[name] for name in self.adapted_names}
        inner_grad = grad(inner_loss)
        for _ in range(steps):
            g = inner_grad(adapted)
            adapted = {name: p - rates.get(name, self.inner_lr) * g[name] for name, p in adapted.items()}
        return {**params, **adapted}

    def _query_objective(self, params: Params, qx: torch.Tensor, qy: torch.Tensor, model=None):
        loss, logits = self._loss(params, qx, qy, model)
        accuracy = (logits.argmax(dim=-1) == qy).float().mean()
        return loss, (loss.detach(), accuracy)

    def _second_order_task(self, meta: Meta, sx, sy, qx, qy):
        def objective(m):
            return self._query_objective(self._adapt(m, sx, sy, self.inner_steps), qx, qy)

        return grad(objective, has_aux=True)(meta)

    def _first_order_task(self, meta: Meta, sx, sy, qx, qy):
        adapted = self._adapt(meta, sx, sy, self.inner_steps)
        grads, aux = grad(self._query_objective, has_aux=True)(adapted, qx, qy)
        return {"params": grads, "rates": {}}, aux

    def _adapted_logits(self, meta: Meta, sx, sy, qx):
        adapted = self._adapt(meta, sx, sy, self.inner_steps_eval)
        return functional_call(self.model, adapted, (qx,))

    # --- the meta-batch: one vmap, or a loop in plain autograd ---------------------
    @staticmethod
    def _vmapped(task_grads):
        """Mean meta-gradient, per-task losses and accuracies from the vmapped task function."""

        def meta_grads(meta: Meta, *episodes):
            grads, (losses, accuracies) = task_grads(meta, *episodes)
            mean = {group: {name: g.mean(dim=0) for name, g in part.items()} for group, part in grads.items()}
            return mean, (losses, accuracies)

        return meta_grads

    def _looped(self, meta: Meta, sx, sy, qx, qy):
        """The same maths as the task functions, a task at a time with torch.autograd, on worker threads."""
        leaves = {
            group: {name: t.detach().requires_grad_() for name, t in part.items()} for group, part in meta.items()
        }

        def run(model, part: slice):
            total = {group: {name: torch.zeros_like(t) for name, t in p.items()} for group, p in leaves.items()}
            losses, accuracies = [], []
            with torch.enable_grad():
                for task in zip(sx[part], sy[part], qx[part], qy[part], strict=False):
                    grads, loss, accuracy = self._task_autograd(model, leaves, *task)
                    for group, p in grads.items():
                        for name, g in p.items():
                            total[group][name] += g
                    losses.append(loss)
                    accuracies.append(accuracy)
            return total, losses, accuracies

        tasks = len(sx)
        results = self._threads.map(run, tasks)
        mean = {
            group: {name: sum(r[0][group][name] for r in results) / tasks for name in part}
            for group, part in leaves.items()
        }
        losses = torch.stack([loss for r in results for loss in r[1]])
        accuracies = torch.stack([accuracy for r in results for accuracy in r[2]])
        return mean, (losses, accuracies)

    def _adapt_autograd(
        self, model: torch.nn.Module, params: Params, rates: Params, sx, sy, steps: int, second_order: bool
    ) -> Params:
        """`steps` inner SGD steps in plain autograd; second order keeps the graph through them."""
        if self.head_only:
            features = functional_call(model.features, sub_params(params, "features"), (sx,))

            def inner_loss(adapted):
                return self._inner_loss(functional_call(model.head, sub_params(adapted, "head"), (features,)), sy)
        else:

            def inner_loss(adapted):
                return self._inner_loss(functional_call(model, adapted, (sx,)), sy)

        names = list(self.adapted_names)

        def inner_step(*values):
            g = torch.autograd.grad(
                inner_loss(dict(zip(names, values, strict=False))), values, create_graph=second_order
            )
            return tuple(p - rates.get(name, self.inner_lr) * gi for name, p, gi in zip(names, values, g, strict=False))

        adapted = tuple(params[name] for name in names)
        for _ in range(steps):
            if second_order and self.checkpoint_inner:  # activations recomputed in the backward pass
                # (the recomputation notes no BatchNorm statistics: the forward pass did)
                adapted = checkpoint(
                    inner_step,
                    *adapted,
                    use_reentrant=False,
                    context_fn=lambda: (nullcontext(), recording_paused(model)),
                )
            else:
                adapted = inner_step(*adapted)
            if not second_order:
                adapted = tuple(p.detach().requires_grad_() for p in adapted)
        return {**params, **dict(zip(names, adapted, strict=False))}

    def _predict_looped(self, meta: Meta, sx, sy, qx) -> torch.Tensor:
        """Query logits after `inner_steps_eval` steps, a task at a time in plain autograd, on worker threads."""
        params = {name: t.detach().requires_grad_() for name, t in meta["params"].items()}

        def task_logits(model, rates, support, labels, query):
            with torch.enable_grad():  # grad mode is per thread: set it here, in the worker
                adapted = self._adapt_autograd(
                    model, params, rates, support, labels, self.inner_steps_eval, second_order=False
                )
            with torch.no_grad():
                return functional_call(model, adapted, (query,))

        return self._threads.over_tasks(task_logits)(meta["rates"], sx, sy, qx)

    def _task_autograd(self, model: torch.nn.Module, leaves: Meta, sx, sy, qx, qy):
        params, rates = leaves["params"], leaves["rates"]
        second_order = not self.first_order
        # The inner passes are differentiated twice in second order: NCHW is faster there.
        with in_nchw(model) if second_order else nullcontext():
            final = self._adapt_autograd(model, params, rates, sx, sy, self.inner_steps, second_order)
        loss, (detached_loss, accuracy) = self._query_objective(final, qx, qy, model)
        targets = leaves if second_order else {"params": final, "rates": {}}
        flat = [t for part in targets.values() for t in part.values()]
        g = iter(torch.autograd.grad(loss, flat))
        grads = {group: {name: next(g) for name in part} for group, part in targets.items()}
        return grads, detached_loss, accuracy

    # --- the algorithm interface -----------------------------------------------
    def _meta(self) -> Meta:
        return {"params": detached_params(self.model), "rates": {name: r.detach() for name, r in self.rates.items()}}

    def _check_ways(self, episodes: Episodes) -> None:
        ways = self.model.head.out_features
        if episodes.support_labels.shape[1] % ways or int(episodes.support_labels.max()) >= ways:
            raise MetalearnError(
                f"this model's head has {ways} outputs, so it adapts to {ways}-way tasks only: use task.ways={ways}."
            )

    def meta_train_step(self, episodes: Episodes) -> dict[str, float]:
        self.model.train()
        with recording(self._threads.models) as batch_statistics:  # model.bn=inductive's running averages
            grads, (losses, accuracies) = self._meta_grads(self._meta(), *episodes)
        batch_statistics.commit(self.model, self.ranks)
        for name, p in self.model.named_parameters():
            p.grad = grads["params"][name]
        for name, r in self.rates.items():
            r.grad = grads["rates"][name]
        self.ranks.average_gradients(self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": losses.mean().item(), "accuracy": accuracies.mean().item()}

    def meta_gradients(self, episodes: Episodes) -> Params:
        """The meta-gradient of one step, without applying it (for tests and benchmarks).

        Weights by name; Meta-SGD's rates as "inner_lr.<weight name>".
        """
        grads, _ = self._meta_grads(self._meta(), *episodes)
        flat = dict(grads["params"])
        flat.update({RATE_PREFIX + name: g for name, g in grads["rates"].items()})
        return flat

    @torch.no_grad()
    def predict(self, episodes: Episodes) -> torch.Tensor:
        self._check_ways(episodes)
        self.model.eval()
        return self._predict(self._meta(), episodes.support, episodes.support_labels, episodes.query)

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "inner_lr": {name: r.detach().clone() for name, r in self.rates.items()},
        }

    def _load_weights_and_rates(self, state: dict, rates_key: str = "Meta-SGD") -> None:
        load_model_state(self.model, state["model"], "The checkpoint")
        saved_rates = state.get("inner_lr", {})
        if set(saved_rates) != set(self.rates):
            raise MetalearnError(
                f"The checkpoint's learned inner rates ({rates_key}) do not match this algorithm: "
                "evaluate or resume with the run's own algo settings."
            )
        with torch.no_grad():
            for name, r in self.rates.items():
                r.copy_(saved_rates[name])

    def load_state_dict(self, state: dict) -> None:
        self._load_weights_and_rates(state)
        if "optimizer" in state:  # an exported model has the weights only (see storage.checkpoint.TRAINING_STATE)
            load_optimizer(self.optimizer, state)
