"""Backbones as plain nn.Modules, built by name from the model config."""

from torch import nn

from metalearn.errors import MetalearnError
from metalearn.models.conv4 import CHANNELS_LAST, NCHW, VMAP, Conv4, in_nchw, set_layout

MODELS = {"conv4": Conv4}


def build_model(model_cfg, num_classes: int, amp: bool = False, layout: str = NCHW) -> nn.Module:
    """The backbone model_cfg names, computing under bf16 autocast (amp) in `layout` (see models.conv4)."""
    if model_cfg.name not in MODELS:
        raise MetalearnError(f"model={model_cfg.name} is not a known model; choose one of: {', '.join(MODELS)}.")
    model = MODELS[model_cfg.name](num_classes=num_classes, hidden=model_cfg.hidden, amp=amp)
    set_layout(model, layout)
    return model


__all__ = ["CHANNELS_LAST", "NCHW", "VMAP", "Conv4", "build_model", "in_nchw", "set_layout"]
