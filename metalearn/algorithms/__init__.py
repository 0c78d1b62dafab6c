"""Algorithms by name; each implements metalearn.algorithms.base.Algorithm."""

import torch

from metalearn.algorithms.base import Algorithm
from metalearn.algorithms.maml import MAML, resolve_vectorize
from metalearn.errors import MetalearnError


def _maml(algo_cfg, model, device):
    return MAML(
        model,
        inner_lr=algo_cfg.inner_lr,
        inner_steps=algo_cfg.inner_steps,
        inner_steps_eval=algo_cfg.inner_steps_eval,
        outer_lr=algo_cfg.outer_lr,
        first_order=algo_cfg.first_order,
        vectorize=resolve_vectorize(algo_cfg.vectorize, device),
    )


ALGORITHMS = {"maml": _maml, "fomaml": _maml}


def build_algorithm(algo_cfg, model: torch.nn.Module, device: torch.device) -> Algorithm:
    if algo_cfg.name not in ALGORITHMS:
        raise MetalearnError(f"algo={algo_cfg.name} is not a known algorithm; choose one of: {', '.join(ALGORITHMS)}.")
    return ALGORITHMS[algo_cfg.name](algo_cfg, model, device)


__all__ = ["Algorithm", "build_algorithm"]
