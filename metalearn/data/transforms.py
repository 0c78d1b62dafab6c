"""What happens to images between the uint8 tensors and the model: per-channel normalisation, and the
random crop and flip that pretraining-based methods train with (data.mean, data.std, data.augment).

Both run on the sampler's device on whole batches; the augmentation draws from the sampler's own
generator, so a resumed run draws what it would have drawn.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from metalearn.errors import MetalearnError


@dataclass(frozen=True)
class Preprocess:
    mean: Sequence[float] | None = None  # per channel, of images scaled to [0, 1]; None: no normalisation
    std: Sequence[float] | None = None
    crop_padding: int | None = None  # pretraining batches: pad, crop back at random, flip half; None: off

    def check(self, channels: int, where: str) -> None:
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and len(values) != channels:
                raise MetalearnError(
                    f"data.{key} has {len(values)} values, but the images of {where} have {channels} channel(s): "
                    f"give one per channel."
                )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """images [..., C, H, W] in [0, 1] -> (images - mean) / std per channel."""
        if self.mean is None:
            return images
        shape = (len(self.mean), 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return (images - mean) / std

    def augment(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """images [B, C, H, W]: each padded by crop_padding (zeros), cropped back to H x W at a random
        offset, and mirrored left-right with probability 1/2."""
        if self.crop_padding is None:
            return images
        b, _, h, w = images.shape
        p = self.crop_padding
        dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
        flip = torch.rand(b, generator=generator) < 0.5
        padded = F.pad(images, (p, p, p, p))
        device = images.device
        rows = (dy[:, None] + torch.arange(h)).to(device)  # [B, H]
        cols = dx[:, None] + torch.arange(w)
        cols = torch.where(flip[:, None], cols.flip(1), cols).to(device)  # [B, W]
        batch = torch.arange(b, device=device)[:, None, None]
        return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


IDENTITY = Preprocess()


def preprocess_of(data_cfg, training: bool = False) -> Preprocess:
    """The dataset's preprocessing from its config; the augmentation for a training sampler only."""
    mean, std = data_cfg.get("mean"), data_cfg.get("std")
    augment = training and bool(data_cfg.get("augment", False))
    return Preprocess(
        mean=list(mean) if mean is not None else None,
        std=list(std) if std is not None else None,
        crop_padding=int(data_cfg.get("crop_padding", 4)) if augment else None,
    )
