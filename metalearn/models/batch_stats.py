"""BatchNorm's two test-time protocols, and the running statistics the inductive one needs.

transductive: BatchNorm normalises every batch with that batch's own
statistics, in training and at test time. A query set is normalised as a
whole, so a query's prediction depends on the other queries of its task.
This is MAML's published protocol (Finn et al.'s code; MAML++'s code calls
batch_norm with training=True at test time too) and Reptile's.

inductive: training batches are normalised with their own statistics and
fold them into running averages; at test time (eval mode) the running
averages normalise, so each query is classified alone. This is the protocol
of ProtoNet's, Baseline's and RFS's code (torch's BatchNorm with
`model.eval()`).

The running averages are never updated inside a forward pass: a torch.func
transform refuses in-place updates of a buffer, and the worker threads of a
meta-batch each run a copy of the model. Instead the layers record each
training batch's statistics while `recording(...)` is open, and
`Recorder.commit` folds them into the model's averages afterwards, in the
order of the tasks, so one thread or several give the same averages, which
equal what torch's in-place update would have computed. Algorithms whose
training passes run under torch.func record in a separate no-grad pass over
the batch (`statistics_pass`).
"""

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from enum import Enum

import torch
from torch import nn


class BatchNormMode(Enum):
    transductive = "transductive"  # the statistics of the batch seen, in training and at test time
    inductive = "inductive"  # running statistics at test time: each query is classified alone


def is_recording_norm(module: nn.Module) -> bool:
    """A BatchNorm layer of ours that keeps running statistics (the inductive mode)."""
    return hasattr(module, "recording") and getattr(module, "running_mean", None) is not None


def record(module: nn.Module, x: torch.Tensor, index: int | None = None) -> None:
    """Note the batch statistics of `x` [N, C, H, W] for the running averages, if recording and not paused."""
    if module.recording is None or module.recording_paused:
        return
    with torch.no_grad():
        count = x.numel() // x.shape[1]
        # One pass over the activations, in their own type (a bf16 copy in float32 would cost another pass;
        # the reduction accumulates in float32 either way).
        var, mean = torch.var_mean(x.detach(), dim=(0, 2, 3), correction=1 if count > 1 else 0)
        module.recording.append((index, _noted(mean), _noted(var)))  # unbiased, as torch's update


def record_moments(module: nn.Module, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """Note statistics computed elsewhere (a batch split across processes); `var` is the biased variance."""
    if module.recording is None or module.recording_paused:
        return
    unbiased = _noted(var.detach()) * (count / max(count - 1, 1))
    module.recording.append((None, _noted(mean.detach()), unbiased))


def _noted(statistic: torch.Tensor) -> torch.Tensor:
    """A statistic as noted: bf16 (autocast) in float32; float32 and a float64 run's own type kept."""
    return statistic if statistic.dtype == torch.float64 else statistic.float()


def _norms(model: nn.Module):
    return [(name, m) for name, m in model.named_modules() if is_recording_norm(m)]


class Recorder:
    """The statistics the layers of some models noted; `commit` folds them into one model's running averages."""

    def __init__(self, notes: list[dict]):
        self.notes = notes  # per model: {layer name: [(step index or None, mean, unbiased variance), ...]}

    def commit(self, target: nn.Module, ranks=None) -> None:
        """Fold every noted batch into `target`'s averages: the first model's batches first, then the next's
        (task threads run contiguous slices of the meta-batch in order), as torch's update would have.

        With `ranks` (metalearn.distributed.Ranks) splitting the batch across processes, the averages are
        then averaged over them, so every process keeps the same ones (close to, not bit for bit, what one
        process would fold)."""
        with torch.no_grad():
            for name, norm in _norms(target):
                momentum = norm.momentum if norm.momentum is not None else 0.1
                for layers in self.notes:
                    for index, mean, var in layers.get(name, ()):
                        running_mean = norm.running_mean if index is None else norm.running_mean[index]
                        running_var = norm.running_var if index is None else norm.running_var[index]
                        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
                        running_var.mul_(1 - momentum).add_(var.to(running_var.dtype), alpha=momentum)
                        if getattr(norm, "num_batches_tracked", None) is not None:
                            norm.num_batches_tracked.add_(1)
            if ranks is not None:
                ranks.average([t for _, norm in _norms(target) for t in (norm.running_mean, norm.running_var)])
        for layers in self.notes:
            for notes in layers.values():
                notes.clear()


@contextmanager
def recording(models: Iterable[nn.Module]):
    """While open, the inductive BatchNorm layers of `models` note each training batch's statistics."""
    models = list(models)
    notes = []
    for model in models:
        layers = {}
        for name, norm in _norms(model):
            norm.recording = layers[name] = []
        notes.append(layers)
    try:
        yield Recorder(notes)
    finally:
        for model in models:
            for _, norm in _norms(model):
                norm.recording = None


class recording_paused:
    """Passes inside the block note nothing (a checkpointed inner step recomputed in the backward pass).

    Reusable: torch.utils.checkpoint may enter a recomputation context more than once."""

    def __init__(self, model: nn.Module):
        self.norms = [norm for _, norm in _norms(model)]

    def __enter__(self):
        for norm in self.norms:
            norm.recording_paused = True

    def __exit__(self, *exc):
        for norm in self.norms:
            norm.recording_paused = False


def has_running_stats(model: nn.Module) -> bool:
    return bool(_norms(model))


@torch.no_grad()
def statistics_pass(model: nn.Module, batches: list[torch.Tensor], ranks=None) -> None:
    """Fold each batch's statistics, under the model's current weights, into its running averages."""
    if not has_running_stats(model):
        return
    was_training = model.training
    model.train()
    with recording([model]) as recorder:
        for batch in batches:
            model(batch)
    recorder.commit(model, ranks)
    model.train(was_training)


def sync_buffers(source: nn.Module, replicas: Sequence[nn.Module]) -> None:
    """Copy `source`'s buffers (running statistics) into replicas of it that compute with its weights."""
    buffers = dict(source.named_buffers())
    if not buffers:
        return
    with torch.no_grad():
        for replica in replicas:
            if replica is source:
                continue
            for name, buffer in replica.named_buffers():
                buffer.copy_(buffers[name])
