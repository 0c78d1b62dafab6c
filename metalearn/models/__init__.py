"""Backbones: nn.Modules that meet metalearn.models.base.Backbone, built from the model config."""

import inspect
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf
from torch import nn

from metalearn.config.settings import component_class, construct, plain, settings_of
from metalearn.errors import MetalearnError
from metalearn.models.base import Backbone, ModelSettings
from metalearn.models.batch_stats import BatchNormMode
from metalearn.models.conv4 import Conv4
from metalearn.models.layout import CHANNELS_LAST, LAYOUTS, NCHW, VMAP, across_ranks, in_nchw, set_layout

# Model configs saved before backbones named their class (checkpoints, run folders): name -> class.
LEGACY_TARGETS = {"conv4": "metalearn.models.conv4.Conv4"}


def model_node(model_cfg) -> DictConfig:
    """The model config as a node, `_target_` filled in for configs saved before it existed."""
    node = model_cfg if isinstance(model_cfg, DictConfig) else OmegaConf.create(model_cfg)
    if "_target_" not in node and node.get("name") in LEGACY_TARGETS:
        node = OmegaConf.merge({"_target_": LEGACY_TARGETS[node.name]}, node)
    return node


def build_model(
    model_cfg, num_classes: int, image_shape: Sequence[int], amp: bool = False, layout: str = NCHW
) -> nn.Module:
    """The backbone model_cfg names, for images of `image_shape` (C, H, W), in `layout` (see models.layout)."""
    node = model_node(model_cfg)
    settings = settings_of(node, "model")
    channels, height, width = image_shape
    if height != width:
        raise MetalearnError(f"the backbones take square images; these are {height}x{width}.")
    cls = component_class(node, "model")
    skip = ("_target_", "name")
    if "bn" not in inspect.signature(cls).parameters:  # a backbone without BatchNorm layers
        if BatchNormMode(plain(settings.bn)) is not BatchNormMode.transductive:
            raise MetalearnError(
                f"model={node.get('name')} has no BatchNorm layers (its class takes no `bn`), so model.bn="
                f"{plain(settings.bn)} changes nothing: leave model.bn unset."
            )
        skip += ("bn",)
    model = construct(
        cls, settings, skip=skip, num_classes=num_classes, in_channels=channels, image_size=height, amp=amp
    )
    set_layout(model, layout)
    return model


__all__ = [
    "across_ranks",
    "Backbone",
    "CHANNELS_LAST",
    "Conv4",
    "LAYOUTS",
    "ModelSettings",
    "NCHW",
    "VMAP",
    "build_model",
    "in_nchw",
    "set_layout",
]
