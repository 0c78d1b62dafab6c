"""The conv4 backbone of Vinyals et al. (2016) and Finn et al. (2017)."""

from contextlib import contextmanager

import torch
from torch import nn


class Conv2d(nn.Conv2d):
    """A convolution that can hand on its output in channels-last memory format.

    A one-channel image batch is both NCHW and NHWC to torch, so the first
    convolution would keep NCHW for the whole network; converting its output
    puts every later layer on the channels-last kernels.
    """

    channels_last = False

    def forward(self, x):
        if not self.channels_last:
            # NCHW-strided weights, or channels-last ones would pull the computation into NHWC
            # (`contiguous()` keeps a one-channel filter's channels-last strides, `clone` does not).
            return self._conv_forward(x, self.weight.clone(memory_format=torch.contiguous_format), self.bias)
        return super().forward(x).contiguous(memory_format=torch.channels_last)


def conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        # Batch statistics at train and test time, as in MAML: no running
        # averages, so a functional call has no buffers to update.
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        # max-pool then ReLU equals ReLU then max-pool (both are monotone),
        # and the ReLU then touches a quarter of the values.
        nn.MaxPool2d(2),
        nn.ReLU(),
    )


class Features(nn.Sequential):
    """The convolutional body, optionally run on the hardware's fast paths.

    `amp` runs it under bf16 autocast and `channels_last` feeds it NHWC
    images; with amp it returns float32 embeddings, so heads, losses and
    the inner-loop updates stay in float32. Neither setting changes the
    parameters, so checkpoints move freely between them.
    """

    amp = False
    channels_last = False

    def forward(self, x):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.amp:
            return super().forward(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            return super().forward(x).float()


def set_channels_last(model: nn.Module, on: bool) -> None:
    """Switch the memory format the model computes in (the weights stay as they are)."""
    for module in model.modules():
        if isinstance(module, (Features, Conv2d)):
            module.channels_last = on


@contextmanager
def in_nchw(model: nn.Module):
    """Compute in NCHW inside the block, whatever device.channels_last says.

    On a CPU channels-last BatchNorm's double backward is several times slower
    than NCHW's, so passes that are differentiated twice (MAML's second-order
    inner loop) run in NCHW. Not thread-safe: one model per thread.
    """
    saved = [(m, m.channels_last) for m in model.modules() if isinstance(m, (Features, Conv2d))]
    set_channels_last(model, False)
    try:
        yield
    finally:
        for module, on in saved:
            module.channels_last = on


class Conv4(nn.Module):
    """4 x [conv3x3, BatchNorm, max-pool 2x2, ReLU] then a linear head; 28x28 -> 1x1.

    `features` maps images to `hidden`-dimensional embeddings; with
    num_classes=0 the head is the identity and the model returns them.
    """

    def __init__(self, num_classes: int, hidden: int = 64, in_channels: int = 1, amp: bool = False,
                 channels_last: bool = False):
        super().__init__()
        self.features = Features(
            conv_block(in_channels, hidden),
            conv_block(hidden, hidden),
            conv_block(hidden, hidden),
            conv_block(hidden, hidden),
            nn.Flatten(),
        )
        self.features.amp = amp
        set_channels_last(self, channels_last)
        if channels_last:
            self.features.to(memory_format=torch.channels_last)
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        return self.head(self.features(x))
