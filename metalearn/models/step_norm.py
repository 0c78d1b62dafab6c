"""BatchNorm with one set of weights and running statistics per inner-loop step (MAML++'s BNWB and BNRS).

Antoniou et al. (2019) give every BatchNorm layer a scale, a shift and
running statistics for each inner step, because the features change as
the weights adapt. `per_step_norms` swaps a backbone's BatchNorm2d layers for
`StepBatchNorm2d`; the algorithm says which step the next pass belongs to
with `set_norm_step`. Steps past the last one trained (more inner steps at
test time) use the last step's entries.
"""

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.models.batch_stats import record
from metalearn.models.layout import BatchNorm2d


class StepBatchNorm2d(nn.Module):
    """BatchNorm2d whose weight and bias ([steps, C]) and running statistics ([steps, C]) are per step,
    either or both; the shared ones are [C] as in torch's layer."""

    recording = None  # see metalearn.models.batch_stats
    recording_paused = False

    def __init__(self, norm: nn.BatchNorm2d, steps: int, per_step_weights: bool, per_step_stats: bool):
        super().__init__()
        self.steps, self.eps, self.momentum = steps, norm.eps, norm.momentum
        self.per_step_weights, self.per_step_stats = per_step_weights, per_step_stats
        self.step = steps - 1

        def per_step(t: torch.Tensor, on: bool) -> torch.Tensor:
            return t.detach().clone().repeat(steps, 1) if on else t.detach().clone()

        self.weight = nn.Parameter(per_step(norm.weight, per_step_weights))
        self.bias = nn.Parameter(per_step(norm.bias, per_step_weights))
        if norm.running_mean is None:  # transductive: the batch's statistics, always
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
        else:
            self.register_buffer("running_mean", per_step(norm.running_mean, per_step_stats))
            self.register_buffer("running_var", per_step(norm.running_var, per_step_stats))

    def forward(self, x):
        step = min(self.step, self.steps - 1)
        weight, bias = (self.weight[step], self.bias[step]) if self.per_step_weights else (self.weight, self.bias)
        if self.running_mean is not None and not self.training:
            mean, var = (
                (self.running_mean[step], self.running_var[step])
                if self.per_step_stats
                else (self.running_mean, self.running_var)
            )
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, self.eps)
        if self.running_mean is not None:
            record(self, x, step if self.per_step_stats else None)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.weight.shape[-1]}, steps={self.steps}, per_step_weights={self.per_step_weights}, "
            f"per_step_stats={self.per_step_stats}, running_stats={self.running_mean is not None}"
        )


def per_step_norms(model: nn.Module, steps: int, per_step_weights: bool, per_step_stats: bool) -> None:
    """Replace, in place, every BatchNorm2d of `model` by a StepBatchNorm2d starting from its weights."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, (BatchNorm2d, nn.BatchNorm2d)):
                step_norm = StepBatchNorm2d(child, steps, per_step_weights, per_step_stats)
                setattr(parent, name, step_norm.to(child.weight.device))


def set_norm_step(model: nn.Module, step: int) -> None:
    """The inner step the next passes through `model` belong to."""
    for module in model.modules():
        if isinstance(module, StepBatchNorm2d):
            module.step = step


def norm_parameter_names(model: nn.Module) -> set:
    """The names of the weights and biases of the model's BatchNorm layers, per-step (StepBatchNorm2d) or not."""
    return {
        f"{prefix}.{name}"
        for prefix, module in model.named_modules()
        if isinstance(module, (StepBatchNorm2d, nn.modules.batchnorm._BatchNorm))
        for name, _ in module.named_parameters(recurse=False)
    }
