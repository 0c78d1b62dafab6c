"""The few-shot ResNet-12 of Lee et al. 2019 (MetaOptNet) and Tian et al. 2020 (RFS).

Four residual blocks (64, 160, 320, 640 channels by default), each three
3x3 convolutions with BatchNorm and leaky ReLU (slope 0.1), a 1x1 convolution
with BatchNorm on the shortcut, then a leaky ReLU and a 2x2 max-pool; the
embedding is the average over the last map (640 numbers for any image size,
as RFS has it). DropBlock (Ghiasi et al. 2018) in the last two blocks is an
option, off by default. BatchNorm follows model.bn as conv4's does
(metalearn.models.batch_stats), so every algorithm runs on it unchanged.
"""

from dataclasses import dataclass, field

import torch
from torch import nn

from metalearn.config.settings import SettingError, at_least, within
from metalearn.errors import MetalearnError
from metalearn.models.base import FeaturesAndHead, ModelSettings
from metalearn.models.batch_stats import BatchNormMode
from metalearn.models.layout import BatchNorm2d, Conv2d, Features, set_channels_last

SLOPE = 0.1  # leaky ReLU, as in both papers' code


@dataclass
class ResNet12Settings(ModelSettings):
    channels: list[int] = field(default_factory=lambda: [64, 160, 320, 640])  # of the four blocks
    dropblock: float = 0.0  # DropBlock's drop rate in the last two blocks (RFS: 0.1); 0: off
    dropblock_size: int = 5  # the side of a dropped block (RFS: 5)

    def __post_init__(self):
        if len(self.channels) != 4 or min(self.channels) < 1:
            raise SettingError("channels", f"must be four positive channel counts (got {self.channels}).")
        within(self, "dropblock", 0.0, 1.0)
        at_least(self, "dropblock_size", 1)


class DropBlock(nn.Module):
    """Drops square blocks of a feature map in training (Ghiasi et al. 2018); the identity otherwise."""

    def __init__(self, rate: float, size: int):
        super().__init__()
        self.rate, self.size = rate, size

    def forward(self, x):
        if not self.training or self.rate == 0:
            return x
        size = min(self.size, x.shape[-1])
        valid = (x.shape[-1] - size + 1) * (x.shape[-2] - size + 1)
        gamma = self.rate / size**2 * x.shape[-1] * x.shape[-2] / max(valid, 1)
        centres = torch.bernoulli(torch.full_like(x, min(gamma, 1.0)))
        dropped = nn.functional.max_pool2d(centres, size, stride=1, padding=size // 2)[
            ..., : x.shape[-2], : x.shape[-1]
        ]
        keep = 1 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp(min=1))


class Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropblock: nn.Module, running_stats: bool = False):
        super().__init__()
        self.body = nn.Sequential(
            Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            BatchNorm2d(out_channels, track_running_stats=running_stats),
            nn.LeakyReLU(SLOPE),
            Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            BatchNorm2d(out_channels, track_running_stats=running_stats),
            nn.LeakyReLU(SLOPE),
            Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            BatchNorm2d(out_channels, track_running_stats=running_stats),
        )
        self.shortcut = nn.Sequential(
            Conv2d(in_channels, out_channels, 1, bias=False),
            BatchNorm2d(out_channels, track_running_stats=running_stats),
        )
        self.out = nn.Sequential(nn.LeakyReLU(SLOPE), nn.MaxPool2d(2), dropblock)

    def forward(self, x):
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(FeaturesAndHead):
    Settings = ResNet12Settings

    def __init__(
        self,
        num_classes: int,
        channels=(64, 160, 320, 640),
        dropblock: float = 0.0,
        dropblock_size: int = 5,
        in_channels: int = 3,
        image_size: int = 84,
        amp: bool = False,
        channels_last: bool = False,
        bn: str = "transductive",
    ):
        super().__init__()
        self.batch_norm = BatchNormMode(bn).value
        running_stats = self.batch_norm == BatchNormMode.inductive.value
        if image_size < 16:
            raise MetalearnError(
                f"model=resnet12 halves the image 4 times, so {image_size}x{image_size} images are too small: "
                f"it needs 16x16 at least."
            )
        widths = [in_channels, *channels]
        blocks = [
            Block(widths[i], widths[i + 1], DropBlock(dropblock if i >= 2 else 0.0, dropblock_size), running_stats)
            for i in range(4)
        ]
        self.features = Features(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.features.amp = amp
        self.feature_size = channels[-1]
        self.head = nn.Linear(self.feature_size, num_classes) if num_classes > 0 else nn.Identity()
        set_channels_last(self, channels_last)
