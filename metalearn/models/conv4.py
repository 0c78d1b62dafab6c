"""The conv4 backbone of Vinyals et al. (2016) and Finn et al. (2017)."""

from dataclasses import dataclass

from torch import nn

from metalearn.config.settings import at_least
from metalearn.errors import MetalearnError
from metalearn.models.base import FeaturesAndHead, ModelSettings
from metalearn.models.batch_stats import BatchNormMode
from metalearn.models.layout import BatchNorm2d, Conv2d, Features, set_channels_last


def conv_block(in_channels: int, out_channels: int, running_stats: bool = False) -> nn.Sequential:
    return nn.Sequential(
        Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        # Transductive (MAML's protocol): batch statistics at train and test time, no running averages.
        BatchNorm2d(out_channels, track_running_stats=running_stats),
        # max-pool then ReLU equals ReLU then max-pool (both are monotone),
        # and the ReLU then touches a quarter of the values.
        nn.MaxPool2d(2),
        nn.ReLU(),
    )


@dataclass
class Conv4Settings(ModelSettings):
    hidden: int = 64  # filters of every convolution

    def __post_init__(self):
        at_least(self, "hidden", 1)


BLOCKS = 4


class Conv4(FeaturesAndHead):
    """4 x [conv3x3, BatchNorm, max-pool 2x2, ReLU] then a linear head; 28x28 -> 1x1, 84x84 -> 5x5.

    `features` maps images to embeddings of `feature_size` = hidden x the
    final map's area; with num_classes=0 the head is the identity and the
    model returns them (see metalearn.models.base.Backbone).
    """

    Settings = Conv4Settings

    def __init__(
        self,
        num_classes: int,
        hidden: int = 64,
        in_channels: int = 1,
        image_size: int = 28,
        amp: bool = False,
        channels_last: bool = False,
        bn: str = "transductive",
    ):
        super().__init__()
        self.batch_norm = BatchNormMode(bn).value
        running_stats = self.batch_norm == BatchNormMode.inductive.value
        side = image_size
        for _ in range(BLOCKS):
            side //= 2
        if side < 1:
            raise MetalearnError(
                f"model=conv4 halves the image {BLOCKS} times, so {image_size}x{image_size} images are too small: "
                f"it needs {2**BLOCKS}x{2**BLOCKS} at least."
            )
        self.feature_size = hidden * side * side
        self.features = Features(
            conv_block(in_channels, hidden, running_stats),
            *(conv_block(hidden, hidden, running_stats) for _ in range(BLOCKS - 1)),
            nn.Flatten(),
        )
        self.features.amp = amp
        self.head = nn.Linear(self.feature_size, num_classes) if num_classes > 0 else nn.Identity()
        set_channels_last(self, channels_last)
