"""Seeded N-way K-shot Q-query episodes drawn with tensor ops on the device.

The whole split lives on the device as uint8; a batch of tasks is a handful of
kernel launches (random keys, argsort, one gather), with no DataLoader and no
per-image Python.
"""

from typing import NamedTuple

import torch

from metalearn.data.split import ClassSplit
from metalearn.errors import MetalearnError


class Episodes(NamedTuple):
    """A batch of T tasks; labels are 0..ways-1 within each task."""

    support: torch.Tensor  # [T, ways*shots, 1, 28, 28] float in [0, 1]
    support_labels: torch.Tensor  # [T, ways*shots]
    query: torch.Tensor  # [T, ways*queries, 1, 28, 28]
    query_labels: torch.Tensor  # [T, ways*queries]

    @property
    def num_tasks(self) -> int:
        return self.support.shape[0]


def check_feasible(split: ClassSplit, ways: int, shots: int, queries: int) -> None:
    """Fail early, saying what is possible, when a split cannot supply such tasks."""
    if ways > split.num_classes:
        raise MetalearnError(
            f"data.ways={ways} asks for more classes than the {split.num_classes} of {split.name}: "
            f"choose data.ways <= {split.num_classes}."
        )
    fewest = int(split.class_counts().min())
    if shots + queries > fewest:
        raise MetalearnError(
            f"data.shots + data.queries = {shots} + {queries} = {shots + queries} images per class, "
            f"but classes of {split.name} have as few as {fewest} images: "
            f"choose data.shots + data.queries <= {fewest} (e.g. data.queries={max(fewest - shots, 1)})."
        )


class EpisodeSampler:
    def __init__(self, split: ClassSplit, ways: int, shots: int, queries: int,
                 device: torch.device, seed: int, dtype: torch.dtype = torch.float32):
        check_feasible(split, ways, shots, queries)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        self.images = split.images.to(self.device)
        counts = split.class_counts()
        # Image ids of each class in one padded table [classes, most images].
        order = torch.argsort(split.labels, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        width = int(counts.max())
        position = torch.arange(width)
        table = torch.where(position < counts[:, None], starts[:, None] + position, starts[:, None])
        self.table = order[table].to(self.device)
        self.counts = counts.to(self.device)
        self.position = position.to(self.device)
        self.generator = torch.Generator(device=self.device)
        self.reseed(seed)
        k = torch.arange(ways, device=self.device)
        self.support_labels = k.repeat_interleave(shots)
        self.query_labels = k.repeat_interleave(queries)

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def sample(self, num_tasks: int) -> Episodes:
        n, k, q = self.ways, self.shots, self.queries
        g, dev = self.generator, self.device
        # A random permutation of the classes per task; its first `ways` are the task's.
        classes = torch.rand(num_tasks, len(self.counts), generator=g, device=dev).argsort(dim=1)[:, :n]
        # Likewise for the images of each chosen class; padding sorts last.
        keys = torch.rand(num_tasks, n, self.position.numel(), generator=g, device=dev)
        keys = keys.masked_fill(self.position >= self.counts[classes][..., None], 2.0)
        picks = keys.argsort(dim=-1)[..., : k + q]
        ids = self.table[classes[..., None], picks]  # [T, ways, shots+queries]
        images = self.images[ids].to(self.dtype).div_(255)  # [T, ways, k+q, 1, H, W]
        shape = images.shape[-3:]
        return Episodes(
            support=images[:, :, :k].reshape(num_tasks, n * k, *shape),
            support_labels=self.support_labels.expand(num_tasks, -1),
            query=images[:, :, k:].reshape(num_tasks, n * q, *shape),
            query_labels=self.query_labels.expand(num_tasks, -1),
        )

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
