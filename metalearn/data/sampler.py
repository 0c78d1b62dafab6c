"""Seeded N-way K-shot Q-query episodes: indexed tasks drawn on the CPU, images gathered on the device.

Episode `i` of a sampler is one fixed task, derived from (seed, part, i)
alone: its classes and images do not depend on how many episodes are drawn
at once, on the algorithm or on the device. So every algorithm, batch size
and machine is scored on the same test tasks, and a training run draws the
same tasks whatever its meta-batch size. The whole split lives on the device
as uint8; a batch is one gather from it.
"""

import hashlib
import logging
from typing import NamedTuple

import torch

from metalearn.data.split import ClassSplit
from metalearn.data.transforms import IDENTITY, Preprocess
from metalearn.errors import MetalearnError

log = logging.getLogger(__name__)

# The share of a GPU's free memory a split's images may take there; the rest is the model's.
DEVICE_SHARE = 0.25


def images_fit(images: torch.Tensor, device: torch.device) -> bool:
    """A split's uint8 images go to the device when they take at most DEVICE_SHARE of its free memory."""
    if device.type != "cuda":
        return True  # the CPU is where they are
    free, _ = torch.cuda.mem_get_info(device)
    size = images.numel() * images.element_size()
    fits = size <= DEVICE_SHARE * free
    log.info(
        "%.0f MiB of images %s: %.0f MiB of the GPU's memory is free (they may take %d%% of it)",
        size / 2**20,
        "sampled on the GPU" if fits else "kept in host memory, each episode copied to the GPU",
        free / 2**20,
        100 * DEVICE_SHARE,
    )
    return fits


class Episodes(NamedTuple):
    """A batch of T tasks; labels are 0..ways-1 within each task."""

    support: torch.Tensor  # [T, ways*shots, C, H, W] float in [0, 1]
    support_labels: torch.Tensor  # [T, ways*shots]
    query: torch.Tensor  # [T, ways*queries, C, H, W]
    query_labels: torch.Tensor  # [T, ways*queries]

    @property
    def num_tasks(self) -> int:
        return self.support.shape[0]

    @property
    def ways(self) -> int:
        return int(self.support_labels.max()) + 1


class LabelledImages(NamedTuple):
    """A plain classification batch: images of any classes of the split, with their class ids."""

    images: torch.Tensor  # [B, C, H, W] float in [0, 1]
    labels: torch.Tensor  # [B], class ids of the split


class TaskKeys(NamedTuple):
    """The config keys that set an episode's ways, shots and queries: what a message tells the user to change."""

    ways: str = "task.ways"
    shots: str = "task.shots"
    queries: str = "task.queries"

    @classmethod
    def of_training(cls, task) -> "TaskKeys":
        """task.train.<key> where it is set, else task.<key>, which it falls back to (TaskConfig.training_shape)."""
        return cls(*(f"task.{key}" if task.train[key] is None else f"task.train.{key}" for key in cls._fields))


TASK_KEYS = TaskKeys()  # the keys of evaluation's and validation's episodes


def check_feasible(split: ClassSplit, ways: int, shots: int, queries: int, keys: TaskKeys = TASK_KEYS) -> None:
    """Fail early, saying what is possible and which key to change, when a split cannot supply such tasks."""
    if ways > split.num_classes:
        raise MetalearnError(
            f"{keys.ways}={ways} asks for more classes than the {split.num_classes} of {split.name}: "
            f"choose {keys.ways} <= {split.num_classes}."
        )
    fewest = int(split.class_counts().min())
    if shots + queries > fewest:
        example = f" (e.g. {keys.queries}={max(fewest - shots, 1)})" if shots < fewest else ""
        raise MetalearnError(
            f"{keys.shots} + {keys.queries} = {shots} + {queries} = {shots + queries} images per class, "
            f"but classes of {split.name} have as few as {fewest} images: "
            f"choose {keys.shots} + {keys.queries} <= {fewest}{example}."
        )


def episode_seed(seed: int, part: str, index: int) -> int:
    """A 63-bit generator seed for episode `index` of `part`, stable across machines and versions of Python."""
    digest = hashlib.blake2b(f"{seed}/{part}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class EpisodeSampler:
    """Draws tasks from one split.

    `episodes(start, count)` returns episodes start..start+count-1 (evaluation
    and validation); `sample(count)` continues a training stream from a
    counter kept in `state_dict`. With `replay_fraction` > 0 (task replay),
    that share of every training batch is drawn again from a bounded buffer
    of earlier tasks (the same classes and images), and the fresh tasks join
    the buffer, oldest replaced first; the buffer is part of `state_dict`.
    """

    def __init__(
        self,
        split: ClassSplit,
        ways: int,
        shots: int,
        queries: int,
        device: torch.device,
        seed: int,
        dtype: torch.dtype = torch.float32,
        replay_fraction: float = 0.0,
        replay_size: int = 0,
        images_on_device: bool | None = None,
        preprocess: Preprocess = IDENTITY,
        keys: TaskKeys = TASK_KEYS,  # the keys that set ways, shots and queries, for the messages
    ):
        check_feasible(split, ways, shots, queries, keys)
        if not 0 <= replay_fraction < 1 or (replay_fraction > 0 and replay_size < 1):
            raise MetalearnError(
                f"task replay needs 0 <= train.replay.fraction < 1 (got {replay_fraction}) "
                f"and train.replay.size >= 1 when it is on (got {replay_size})."
            )
        self.ways, self.shots, self.queries = ways, shots, queries
        self.device, self.dtype, self.seed, self.part = torch.device(device), dtype, seed, split.part
        preprocess.check(split.image_shape[0], split.name)
        self.preprocess = preprocess
        self.on_device = images_fit(split.images, self.device) if images_on_device is None else images_on_device
        # On the device, an episode is gathered there; else in host memory, and only the episode travels.
        self.images = split.images.to(self.device) if self.on_device else split.images
        self.labels = split.labels.to(self.device)
        counts = split.class_counts()
        # Image ids of each class in one padded table [classes, most images] (on the CPU, like all draws).
        order = torch.argsort(split.labels, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        width = int(counts.max())
        position = torch.arange(width)
        self.table = order[torch.where(position < counts[:, None], starts[:, None] + position, starts[:, None])]
        self.padding = position >= counts[:, None]  # [classes, width]: slots past a class's last image
        # Replay picks and classifier batches: a CPU generator, so every device draws the same.
        self.generator = torch.Generator()
        self.generator.manual_seed(seed)
        self.next_episode = 0
        k = torch.arange(ways, device=self.device)
        self.support_labels = k.repeat_interleave(shots)
        self.query_labels = k.repeat_interleave(queries)
        self.replay_fraction = replay_fraction
        # Image ids of earlier tasks [replay_size, ways, shots+queries]; `replay_filled` rows are valid.
        self.replay_buffer = torch.zeros(
            replay_size if replay_fraction > 0 else 0, ways, shots + queries, dtype=torch.long
        )
        self.replay_filled = 0
        self.replay_next = 0

    def _images(self, ids: torch.Tensor) -> torch.Tensor:
        """The uint8 images of `ids` on the device, gathered there or on the host."""
        if self.on_device:
            return self.images[ids.to(self.device)]
        gathered = self.images[ids.cpu()]
        if self.device.type == "cuda":  # from pinned memory the copy runs alongside the GPU's work
            gathered = gathered.pin_memory()
        return gathered.to(self.device, non_blocking=True)

    def episode_ids(self, start: int, count: int) -> torch.Tensor:
        """Image ids [count, ways, shots+queries] of episodes start..start+count-1, on the CPU."""
        n, per_class = self.ways, self.shots + self.queries
        tasks = []
        for index in range(start, start + count):
            g = torch.Generator().manual_seed(episode_seed(self.seed, self.part, index))
            classes = torch.randperm(len(self.table), generator=g)[:n]
            # A random order of each chosen class's images; padding sorts last.
            keys = torch.rand(n, self.table.shape[1], generator=g).masked_fill(self.padding[classes], 2.0)
            tasks.append(self.table[classes[:, None], keys.argsort(dim=1)[:, :per_class]])
        return torch.stack(tasks) if tasks else torch.zeros(0, n, per_class, dtype=torch.long)

    def episodes(self, start: int, count: int) -> Episodes:
        """Episodes start..start+count-1: the same tasks for any batching, algorithm and device."""
        return self.gather(self.episode_ids(start, count))

    def _replay(self, fresh: torch.Tensor, num_replayed: int) -> torch.Tensor:
        """Earlier tasks drawn from the buffer; then the fresh ones are stored."""
        replayed = self.replay_buffer[:0]
        if num_replayed:
            picks = torch.randint(self.replay_filled, (num_replayed,), generator=self.generator)
            replayed = self.replay_buffer[picks]
        size = len(self.replay_buffer)
        stored = fresh[-size:]  # at most one buffer's worth
        slots = (self.replay_next + torch.arange(len(stored))) % size
        self.replay_buffer[slots] = stored
        self.replay_next = (self.replay_next + len(stored)) % size
        self.replay_filled = min(self.replay_filled + len(stored), size)
        return replayed

    def sample_ids(self, num_tasks: int) -> torch.Tensor:
        """Image ids of the next training batch: fresh episodes from the counter, plus replayed ones."""
        num_replayed = min(round(self.replay_fraction * num_tasks), self.replay_filled)
        ids = self.episode_ids(self.next_episode, num_tasks - num_replayed)
        self.next_episode += num_tasks - num_replayed
        if self.replay_fraction > 0:
            ids = torch.cat([ids, self._replay(ids, num_replayed)])
        return ids

    def sample(self, num_tasks: int) -> Episodes:
        return self.gather(self.sample_ids(num_tasks))

    def sample_images(self, count: int) -> LabelledImages:
        """`count` images drawn uniformly from the whole split, for classifier pretraining."""
        ids = torch.randint(len(self.images), (count,), generator=self.generator)
        images = self.preprocess.augment(self._images(ids).to(self.dtype).div_(255), self.generator)
        return LabelledImages(self.preprocess.normalize(images), self.labels[ids.to(self.device)])

    def gather(self, ids: torch.Tensor) -> Episodes:
        """The episodes of image ids [T, ways, shots+queries], on the device."""
        num_tasks, n, k = len(ids), self.ways, self.shots
        images = self.preprocess.normalize(self._images(ids).to(self.dtype).div_(255))  # [T, ways, k+q, C, H, W]
        shape = images.shape[-3:]
        return Episodes(
            support=images[:, :, :k].reshape(num_tasks, n * k, *shape),
            support_labels=self.support_labels.expand(num_tasks, -1),
            query=images[:, :, k:].reshape(num_tasks, n * self.queries, *shape),
            query_labels=self.query_labels.expand(num_tasks, -1),
        )

    def state_dict(self) -> dict:
        return {
            "next_episode": self.next_episode,
            "generator": self.generator.get_state(),
            "replay_buffer": self.replay_buffer[: self.replay_filled].clone(),
            "replay_next": self.replay_next,
        }

    def load_state_dict(self, state: dict) -> None:
        if "next_episode" not in state:
            raise MetalearnError(
                "the checkpoint's task sampler comes from an older metalearn that drew tasks differently, so the "
                "run cannot continue exactly: evaluate it (metalearn eval run=...) or start a new run."
            )
        self.next_episode = int(state["next_episode"])
        self.generator.set_state(state["generator"])
        saved = state.get("replay_buffer")
        if saved is not None and len(saved):
            if saved.shape[1:] != self.replay_buffer.shape[1:] or len(saved) > len(self.replay_buffer):
                raise MetalearnError(
                    f"the checkpoint's task-replay buffer ({tuple(saved.shape)}) does not fit this configuration "
                    f"(train.replay.size={len(self.replay_buffer)}, {self.ways}-way, "
                    f"{self.shots + self.queries} images per class): resume with the run's own settings."
                )
            self.replay_buffer[: len(saved)] = saved
        self.replay_filled = 0 if saved is None else len(saved)
        self.replay_next = state.get("replay_next", 0)
