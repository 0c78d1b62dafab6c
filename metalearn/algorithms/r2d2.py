"""R2-D2 (Bertinetto, Henriques, Torr & Vedaldi 2019, "Meta-learning with differentiable closed-form solvers").

Each task's head is ridge regression from the support embeddings X [shots x ways, d] to their one-hot
labels Y, solved in closed form, W = (X^T X + lambda I)^-1 X^T Y, in its Woodbury form
W = X^T (X X^T + lambda I)^-1 Y when features outnumber support images (an n x n system, n the support
size). Query logits are alpha X_q W + beta. The regulariser lambda, the scale alpha and the bias beta
are learned with the network (lambda through its logarithm, so it stays positive), and the whole
solve is differentiated through.
"""

import math
from dataclasses import dataclass

import torch

from metalearn.algorithms.metric import MetricLearner, MetricSettings, class_one_hot
from metalearn.config.settings import positive


@dataclass
class R2D2Settings(MetricSettings):
    ridge_lambda: float = 1.0  # the ridge regulariser's starting value (learned)
    scale: float = 1.0  # alpha's starting value (learned)
    bias: float = 0.0  # beta's starting value (learned)

    def __post_init__(self):
        super().__post_init__()
        positive(self, "ridge_lambda")
        positive(self, "scale")


def ridge_weights(support: torch.Tensor, targets: torch.Tensor, ridge_lambda: torch.Tensor) -> torch.Tensor:
    """W [d, ways] minimising |X W - Y|^2 + lambda |W|^2; the smaller of the two linear systems is solved."""
    n, d = support.shape
    if d > n:  # Woodbury: an n x n system
        gram = support @ support.T + ridge_lambda * torch.eye(n, dtype=support.dtype, device=support.device)
        return support.T @ torch.linalg.solve(gram, targets)
    gram = support.T @ support + ridge_lambda * torch.eye(d, dtype=support.dtype, device=support.device)
    return torch.linalg.solve(gram, support.T @ targets)


class R2D2(MetricLearner):
    Settings = R2D2Settings

    def initial_head(self, embedding_size: int) -> dict[str, float]:
        # beta shifts every logit alike, so cross-entropy gives it no gradient; it is kept as the paper has it.
        settings = self.head_settings
        return {"log_lambda": math.log(settings["ridge_lambda"]), "scale": settings["scale"], "bias": settings["bias"]}

    def head_logits(self, head, support, support_labels, query, ways: int) -> torch.Tensor:
        # The solve in float32 at least: linear algebra has no bf16 kernels, and a bf16 Gram matrix loses the
        # small differences the solution depends on.
        dtype = torch.promote_types(support.dtype, torch.float32)
        with torch.autocast(support.device.type, enabled=False):
            support, query = support.to(dtype), query.to(dtype)
            targets = class_one_hot(support_labels, ways, dtype)
            weights = ridge_weights(support, targets, head["log_lambda"].to(dtype).exp())
            return head["scale"].to(dtype) * (query @ weights) + head["bias"].to(dtype)
