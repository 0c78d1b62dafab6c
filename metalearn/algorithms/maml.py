"""MAML and first-order MAML (Finn, Abbeel & Levine 2017) with torch.func.

One pure function computes a task's meta-gradient: adapt a copy of the
weights on the support set with `inner_steps` SGD steps, then differentiate
the query loss. Second order differentiates through the inner updates; first
order takes the query gradient at the adapted weights. The meta-batch runs
that function as one `vmap` or as a loop over tasks: the same numbers either
way (the tests pin both against a naive autograd loop in float64).
`vmap(grad(task))` is used rather than `grad(mean(vmap(task)))`, which gives
wrong second-order gradients through the native batch norm in torch 2.14.
"""

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from metalearn.algorithms.base import Algorithm, load_model_state
from metalearn.config import Vectorize
from metalearn.data import Episodes

Params = Dict[str, torch.Tensor]


def resolve_vectorize(choice, device: torch.device) -> bool:
    """True for vmap: on CUDA under auto; on CPU a loop is faster and leaner."""
    choice = Vectorize(choice) if not isinstance(choice, Vectorize) else choice
    if choice is Vectorize.auto:
        return torch.device(device).type == "cuda"
    return choice is Vectorize.vmap


def _stack(items):
    """Stack a list of equally shaped (nested dict / tuple of) tensors along a new dim 0."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(items)
    if isinstance(first, dict):
        return {key: _stack([item[key] for item in items]) for key in first}
    return tuple(_stack(list(group)) for group in zip(*items))


class MAML(Algorithm):
    def __init__(self, model: torch.nn.Module, inner_lr: float, inner_steps: int, inner_steps_eval: int,
                 outer_lr: float, first_order: bool, vectorize: bool):
        self.model = model
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        self.inner_steps_eval = inner_steps_eval
        self.first_order = first_order
        self.vectorize = vectorize
        self.optimizer = torch.optim.Adam(model.parameters(), lr=outer_lr)
        task_fn = self._first_order_task if first_order else self._second_order_task
        self._meta_grads = vmap(task_fn, in_dims=(None, 0, 0, 0, 0)) if vectorize else self._looped(task_fn)
        self._predict = vmap(self._adapted_logits, in_dims=(None, 0, 0, 0)) if vectorize else self._looped(
            self._adapted_logits)

    # --- pure per-task functions -------------------------------------------------
    def _loss(self, params: Params, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(self.model, params, (x,))
        return F.cross_entropy(logits, y), logits

    def _adapt(self, params: Params, x: torch.Tensor, y: torch.Tensor, steps: int) -> Params:
        inner_grad = grad(lambda p: self._loss(p, x, y)[0])
        for _ in range(steps):
            g = inner_grad(params)
            params = {name: p - self.inner_lr * g[name] for name, p in params.items()}
        return params

    def _query_objective(self, params: Params, qx: torch.Tensor, qy: torch.Tensor):
        loss, logits = self._loss(params, qx, qy)
        accuracy = (logits.argmax(dim=-1) == qy).float().mean()
        return loss, (loss.detach(), accuracy)

    def _second_order_task(self, params: Params, sx, sy, qx, qy):
        def objective(p):
            return self._query_objective(self._adapt(p, sx, sy, self.inner_steps), qx, qy)

        return grad(objective, has_aux=True)(params)

    def _first_order_task(self, params: Params, sx, sy, qx, qy):
        adapted = self._adapt(params, sx, sy, self.inner_steps)
        return grad(self._query_objective, has_aux=True)(adapted, qx, qy)

    def _adapted_logits(self, params: Params, sx, sy, qx):
        adapted = self._adapt(params, sx, sy, self.inner_steps_eval)
        return functional_call(self.model, adapted, (qx,))

    @staticmethod
    def _looped(task_fn):
        """The same per-task function over the meta-batch, one task at a time, stacked."""

        def run(params, *batched):
            return _stack([task_fn(params, *task) for task in zip(*batched)])

        return run

    # --- the algorithm interface -----------------------------------------------
    def _params(self) -> Params:
        return {name: p.detach() for name, p in self.model.named_parameters()}

    def meta_train_step(self, episodes: Episodes) -> Dict[str, float]:
        self.model.train()
        grads, (losses, accuracies) = self._meta_grads(self._params(), *episodes)
        for name, p in self.model.named_parameters():
            p.grad = grads[name].mean(dim=0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": losses.mean().item(), "accuracy": accuracies.mean().item()}

    def meta_gradients(self, episodes: Episodes) -> Params:
        """The meta-gradient of one step, without applying it (for tests and benchmarks)."""
        grads, _ = self._meta_grads(self._params(), *episodes)
        return {name: g.mean(dim=0) for name, g in grads.items()}

    @torch.no_grad()
    def predict(self, episodes: Episodes) -> torch.Tensor:
        self.model.eval()
        return self._predict(self._params(), episodes.support, episodes.support_labels, episodes.query)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        load_model_state(self.model, state["model"], "The checkpoint")
        self.optimizer.load_state_dict(state["optimizer"])
