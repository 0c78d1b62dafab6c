"""Turn device.name into a torch.device, with a clear error when it cannot be had."""

import torch

from metalearn.errors import MetalearnError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MetalearnError(f"device.name={name} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise MetalearnError(
                f"device={name} asks for a CUDA GPU, but torch sees none (torch.cuda.is_available() is False). "
                f"Use device=cpu, or device=auto to take a GPU only when there is one."
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise MetalearnError(
                f"device.name={name}: there are only {torch.cuda.device_count()} CUDA devices (cuda:0..)."
            )
    elif device.type != "cpu":
        raise MetalearnError(f"device.name={name} is not supported; use auto, cpu, cuda or cuda:N.")
    return device
