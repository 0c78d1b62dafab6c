"""The conv4 backbone of Vinyals et al. (2016) and Finn et al. (2017)."""

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
        y = super().forward(x)
        return y.contiguous(memory_format=torch.channels_last) if self.channels_last else y


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
        self.features.amp, self.features.channels_last = amp, channels_last
        if channels_last:
            self.features.to(memory_format=torch.channels_last)
            for module in self.features.modules():
                if isinstance(module, Conv2d):
                    module.channels_last = True
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        return self.head(self.features(x))
