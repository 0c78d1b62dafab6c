"""Backbones as plain nn.Modules, built by name from the model config."""

from torch import nn

from metalearn.errors import MetalearnError
from metalearn.models.conv4 import Conv4, in_nchw

MODELS = {"conv4": Conv4}


def build_model(model_cfg, num_classes: int, device_cfg=None) -> nn.Module:
    """The backbone model_cfg names; device_cfg (amp, channels_last) picks its fast paths."""
    if model_cfg.name not in MODELS:
        raise MetalearnError(f"model={model_cfg.name} is not a known model; choose one of: {', '.join(MODELS)}.")
    fast = {} if device_cfg is None else {"amp": device_cfg.amp, "channels_last": device_cfg.channels_last}
    return MODELS[model_cfg.name](num_classes=num_classes, hidden=model_cfg.hidden, **fast)
