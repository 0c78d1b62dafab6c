"""The conv4 backbone of Vinyals et al. (2016) and Finn et al. (2017)."""

from dataclasses import dataclass
from enum import Enum

from torch import nn

from metalearn.config.settings import at_least
from metalearn.errors import MetalearnError
from metalearn.models.base import FeaturesAndHead, ModelSettings
from metalearn.models.batch_stats import BatchNormMode
from metalearn.models.layout import BatchNorm2d, Conv2d, Features, set_channels_last


class Activation(Enum):
    relu = "relu"  # Vinyals et al.'s and Finn et al.'s network
    leaky_relu = "leaky_relu"  # slope 0.01 below zero (F.leaky_relu's default), as MAML++'s code


class Init(Enum):
    default = "default"  # torch's layer defaults
    xavier = "xavier"  # Xavier-uniform convolution and head weights, zero biases, as MAML++'s code


ACTIVATIONS = {Activation.relu: nn.ReLU, Activation.leaky_relu: nn.LeakyReLU}


def conv_block(
    in_channels: int, out_channels: int, running_stats: bool = False, activation: str = "relu"
) -> nn.Sequential:
    return nn.Sequential(
        Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        # Transductive (MAML's protocol): batch statistics at train and test time, no running averages.
        BatchNorm2d(out_channels, track_running_stats=running_stats),
        # max-pool then the activation equals the activation then max-pool (both are monotone),
        # and the activation then touches a quarter of the values.
        nn.MaxPool2d(2),
        ACTIVATIONS[Activation(activation)](),
    )


def xavier_init(model: nn.Module) -> None:
    """MAML++'s code's initialisation: Xavier-uniform weights and zero biases for the convolutions and the head."""
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


@dataclass
class Conv4Settings(ModelSettings):
    hidden: int = 64  # filters of every convolution
    activation: Activation = Activation.relu  # after each block: relu, or leaky_relu (slope 0.01, MAML++'s code)
    init: Init = Init.default  # default (torch's), or xavier: Xavier-uniform weights, zero biases (MAML++'s code)

    def __post_init__(self):
        at_least(self, "hidden", 1)


BLOCKS = 4


class Conv4(FeaturesAndHead):
    """4 x [conv3x3, BatchNorm, max-pool 2x2, ReLU or leaky ReLU] then a linear head; 28x28 -> 1x1, 84x84 -> 5x5.

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
        activation: str = "relu",
        init: str = "default",
    ):
        super().__init__()
        self.batch_norm = BatchNormMode(bn).value
        activation, init = Activation(activation), Init(init)
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
            conv_block(in_channels, hidden, running_stats, activation),
            *(conv_block(hidden, hidden, running_stats, activation) for _ in range(BLOCKS - 1)),
            nn.Flatten(),
        )
        self.features.amp = amp
        self.head = nn.Linear(self.feature_size, num_classes) if num_classes > 0 else nn.Identity()
        if init is Init.xavier:  # after torch's defaults, which draw first: the default init is unchanged
            xavier_init(self)
        set_channels_last(self, channels_last)
