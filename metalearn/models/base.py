"""The backbone contract: what an algorithm may rely on in a model.

A backbone is a component (metalearn.config.settings): conf/model/<name>.yaml names
its class with `_target_`, and the class's `Settings` dataclass types and
checks the model.* keys. The runner constructs it as

    Backbone(num_classes, in_channels=..., image_size=..., amp=..., **settings)

with the image channels and side length of the dataset's images (never a
constant), and num_classes the head size the algorithm asks for: task.ways
(MAML, Reptile), the meta-training classes (finetune, distill) or 0 for no
head (ProtoNet: the model returns its embedding).

To compute on a device's fast paths, a backbone builds its layers from
metalearn.models.layout (`Conv2d`, `BatchNorm2d` and a `Features` body):
then `set_layout` switches it between channels-last, NCHW and the vmap
layout and `in_nchw` works on it. `amp` runs the body under bf16 autocast
(Features does this and returns float32 embeddings). A backbone of plain
torch modules works too, always in NCHW and float32.
"""

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from omegaconf import MISSING
from torch import nn

from metalearn.models.batch_stats import BatchNormMode


@dataclass
class ModelSettings:
    """The keys every backbone has; its own schema adds its settings, each checked in __post_init__."""

    _target_: str = MISSING  # the backbone's class
    name: str = MISSING  # how runs and messages name it
    # transductive: BatchNorm normalises with the statistics of the batch it sees, also at test time (MAML's
    # protocol); inductive: running statistics at test time, each query classified alone (ProtoNet's code).
    bn: BatchNormMode = BatchNormMode.transductive


class FeaturesAndHead(nn.Module):
    """A backbone that is a `features` body (metalearn.models.layout.Features) followed by a `head`."""

    batch_norm = BatchNormMode.transductive.value  # the model's `bn` setting, as evaluations record it

    @property
    def layout(self) -> str:
        """The layout the network computes in (see metalearn.models.layout)."""
        return self.features.layout

    def forward(self, x):
        return self.head(self.features(x))


@runtime_checkable
class Backbone(Protocol):
    features: nn.Module  # images [N, C, H, W] -> embeddings [N, feature_size]
    head: nn.Module  # embeddings -> logits [N, num_classes]: nn.Linear, or nn.Identity when num_classes is 0
    feature_size: int  # the embedding's length
    # How BatchNorm normalises at test time, recorded with every evaluation: "transductive" (the batch's
    # own statistics, as in MAML), "inductive" (running statistics) or "none".
    batch_norm: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...
