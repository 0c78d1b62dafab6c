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

    @property
    def ways(self) -> int:
        return int(self.support_labels.max()) + 1


class LabelledImages(NamedTuple):
    """A plain classification batch: images of any classes of the split, with their class ids."""

    images: torch.Tensor  # [B, 1, 28, 28] float in [0, 1]
    labels: torch.Tensor  # [B], class ids of the split


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
    """Draws batches of tasks from one split.

    With `replay_fraction` > 0 (task replay), that share of every batch is
    drawn again from a bounded buffer of earlier tasks (the same classes and
    images), and the fresh tasks join the buffer, oldest replaced first. The
    buffer is part of `state_dict`, so a resumed run replays the same tasks.
    """

    def __init__(self, split: ClassSplit, ways: int, shots: int, queries: int,
                 device: torch.device, seed: int, dtype: torch.dtype = torch.float32,
                 replay_fraction: float = 0.0, replay_size: int = 0):
        check_feasible(split, ways, shots, queries)
        if not 0 <= replay_fraction < 1 or (replay_fraction > 0 and replay_size < 1):
            raise MetalearnError(
                f"task replay needs 0 <= data.replay.fraction < 1 (got {replay_fraction}) "
                f"and data.replay.size >= 1 when it is on (got {replay_size})."
            )
        self.ways, self.shots, self.queries = ways, shots, queries
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
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
        self.replay_fraction = replay_fraction
        # Image ids of earlier tasks [replay_size, ways, shots+queries]; `replay_filled` rows are valid.
        self.replay_buffer = torch.zeros(replay_size if replay_fraction > 0 else 0, ways, shots + queries,
                                         dtype=torch.long, device=self.device)
        self.replay_filled = 0
        self.replay_next = 0

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def _fresh_ids(self, num_tasks: int) -> torch.Tensor:
        """Image ids [T, ways, shots+queries] of new random tasks."""
        n, k, q = self.ways, self.shots, self.queries
        g, dev = self.generator, self.device
        # A random permutation of the classes per task; its first `ways` are the task's.
        classes = torch.rand(num_tasks, len(self.counts), generator=g, device=dev).argsort(dim=1)[:, :n]
        # Likewise for the images of each chosen class; padding sorts last.
        keys = torch.rand(num_tasks, n, self.position.numel(), generator=g, device=dev)
        keys = keys.masked_fill(self.position >= self.counts[classes][..., None], 2.0)
        picks = keys.argsort(dim=-1)[..., : k + q]
        return self.table[classes[..., None], picks]

    def _replay(self, fresh: torch.Tensor, num_replayed: int) -> torch.Tensor:
        """Earlier tasks drawn from the buffer; then the fresh ones are stored."""
        replayed = self.replay_buffer[:0]
        if num_replayed:
            picks = torch.randint(self.replay_filled, (num_replayed,), generator=self.generator, device=self.device)
            replayed = self.replay_buffer[picks]
        size = len(self.replay_buffer)
        stored = fresh[-size:]  # at most one buffer's worth
        slots = (self.replay_next + torch.arange(len(stored), device=self.device)) % size
        self.replay_buffer[slots] = stored
        self.replay_next = (self.replay_next + len(stored)) % size
        self.replay_filled = min(self.replay_filled + len(stored), size)
        return replayed

    def sample(self, num_tasks: int) -> Episodes:
        num_replayed = min(round(self.replay_fraction * num_tasks), self.replay_filled)
        ids = self._fresh_ids(num_tasks - num_replayed)
        if self.replay_fraction > 0:
            ids = torch.cat([ids, self._replay(ids, num_replayed)])
        return self._gather(ids)

    def sample_images(self, count: int) -> LabelledImages:
        """`count` images drawn uniformly from the whole split, for classifier pretraining."""
        ids = torch.randint(len(self.images), (count,), generator=self.generator, device=self.device)
        return LabelledImages(self.images[ids].to(self.dtype).div_(255), self.labels[ids])

    def _gather(self, ids: torch.Tensor) -> Episodes:
        num_tasks, n, k = len(ids), self.ways, self.shots
        images = self.images[ids].to(self.dtype).div_(255)  # [T, ways, k+q, 1, H, W]
        shape = images.shape[-3:]
        return Episodes(
            support=images[:, :, :k].reshape(num_tasks, n * k, *shape),
            support_labels=self.support_labels.expand(num_tasks, -1),
            query=images[:, :, k:].reshape(num_tasks, n * self.queries, *shape),
            query_labels=self.query_labels.expand(num_tasks, -1),
        )

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(),
                "replay_buffer": self.replay_buffer[: self.replay_filled].clone(),
                "replay_next": self.replay_next}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        saved = state.get("replay_buffer")
        if saved is not None and len(saved):
            if saved.shape[1:] != self.replay_buffer.shape[1:] or len(saved) > len(self.replay_buffer):
                raise MetalearnError(
                    f"the checkpoint's task-replay buffer ({tuple(saved.shape)}) does not fit this configuration "
                    f"(data.replay.size={len(self.replay_buffer)}, {self.ways}-way, "
                    f"{self.shots + self.queries} images per class): resume with the run's own settings."
                )
            self.replay_buffer[: len(saved)] = saved.to(self.device)
        self.replay_filled = 0 if saved is None else len(saved)
        self.replay_next = state.get("replay_next", 0)
