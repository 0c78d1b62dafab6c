"""The memory-format hooks a backbone uses to compute on a device's fast paths.

A backbone built from these modules (`Conv2d`, `BatchNorm2d`, and a
`Features` body) can be switched between three layouts with `set_layout`,
and `in_nchw` computes a block in NCHW whatever the layout; a backbone made of
plain torch modules simply computes in NCHW under every layout.
"""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from metalearn.models.batch_stats import record, record_moments

# How a model's convolutions lay out their activations:
CHANNELS_LAST = "channels_last"  # NHWC, the fast kernels of a CPU's loop over tasks
NCHW = "nchw"  # forced NCHW, also for weights that came out of a channels-last backward
VMAP = "vmap"  # no explicit memory-format calls (vmap supports none) and float BatchNorm inputs
LAYOUTS = (CHANNELS_LAST, NCHW, VMAP)


class Conv2d(nn.Conv2d):
    """A convolution that hands its output on in the model's layout.

    A one-channel image batch is both NCHW and NHWC to torch, so the first
    convolution would keep NCHW for the whole network; converting its output
    puts every later layer on the channels-last kernels.
    """

    layout = NCHW

    def forward(self, x):
        if self.layout == CHANNELS_LAST:
            return super().forward(x).contiguous(memory_format=torch.channels_last)
        if self.layout == NCHW:
            # NCHW-strided weights, or channels-last ones would pull the computation into NHWC
            # (`contiguous()` keeps a one-channel filter's channels-last strides, `clone` does not).
            return self._conv_forward(x, self.weight.clone(memory_format=torch.contiguous_format), self.bias)
        return super().forward(x)


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm that, in the vmap layout, normalises a bf16 input in float32, and that can normalise a
    batch split across processes with the statistics of the whole of it (`across_ranks`).

    Under vmap the backward of a bf16 input with float32 weights fails in
    torch 2.14 ("expected scalar type BFloat16 but found Float"); the next
    convolution casts back to bf16 under autocast, so only this op changes.
    """

    layout = NCHW
    ranks = None  # while a batch split across processes passes through: metalearn.distributed.Ranks
    # With running statistics (model.bn=inductive), training batches are noted here while
    # metalearn.models.batch_stats.recording is open, never folded in place (see that module).
    recording = None
    recording_paused = False

    def forward(self, x):
        if self.layout == VMAP and x.dtype != self.weight.dtype:
            x = x.to(self.weight.dtype)
        if self.ranks is not None and (self.training or self.running_mean is None):
            return self._over_ranks(x)
        if self.running_mean is None:  # transductive: the batch's own statistics, always
            return super().forward(x)
        if not self.training:  # inductive, at test time: the running statistics
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        record(self, x)
        return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def _over_ranks(self, x):
        """Batch statistics summed over the ranks, differentiably (what torch's SyncBatchNorm does, on GPUs
        only): every rank's outputs are those of the whole batch."""
        from metalearn.distributed import sum_over_ranks

        dtype = x.dtype
        x = x.float() if dtype in (torch.bfloat16, torch.float16) else x
        channels, dims = x.shape[1], (0, 2, 3)
        count = round(x.shape[0] / self.ranks.share) * x.shape[2] * x.shape[3]  # the images of every rank
        sums = sum_over_ranks(torch.cat([x.sum(dims), (x * x).sum(dims)]), self.ranks) / count
        mean, var = sums[:channels], sums[channels:] - sums[:channels] ** 2
        if self.running_mean is not None:
            record_moments(self, mean, var, count)
        y = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y.to(dtype)


@contextmanager
def across_ranks(model: nn.Module, ranks):
    """The model's BatchNorm2d layers normalise a batch split across `ranks` as the whole batch."""
    norms = [m for m in model.modules() if isinstance(m, BatchNorm2d)] if ranks.active else []
    for norm in norms:
        norm.ranks = ranks
    try:
        yield
    finally:
        for norm in norms:
            norm.ranks = None


class Features(nn.Sequential):
    """The convolutional body, optionally run on the hardware's fast paths.

    `amp` runs it under bf16 autocast and the channels-last layout feeds it
    NHWC images; with amp it returns float32 embeddings, so heads, losses and
    the inner-loop updates stay in float32. Neither setting changes the
    parameters, so checkpoints move freely between them.
    """

    amp = False
    layout = NCHW

    def forward(self, x):
        if self.layout == CHANNELS_LAST:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.amp:
            return super().forward(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return super().forward(x).float()


_LAYOUT_MODULES = (Features, Conv2d, BatchNorm2d)


def set_layout(model: nn.Module, layout: str) -> None:
    """Switch the layout the model computes in; the weights follow (NHWC or NCHW storage)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    for module in model.modules():
        if isinstance(module, _LAYOUT_MODULES):
            module.layout = layout
    model.to(memory_format=torch.channels_last if layout == CHANNELS_LAST else torch.contiguous_format)


def set_channels_last(model: nn.Module, on: bool) -> None:
    set_layout(model, CHANNELS_LAST if on else NCHW)


@contextmanager
def in_nchw(model: nn.Module):
    """Compute in NCHW inside the block, whatever the model's layout (the weights stay as they are).

    On a CPU channels-last BatchNorm's double backward is several times slower
    than NCHW's, so passes that are differentiated twice (MAML's second-order
    inner loop) run in NCHW. Not thread-safe: one model per thread.
    """
    saved = [(m, m.layout) for m in model.modules() if isinstance(m, _LAYOUT_MODULES)]
    for module, layout in saved:
        if layout == CHANNELS_LAST:
            module.layout = NCHW
    try:
        yield
    finally:
        for module, layout in saved:
            module.layout = layout
