"""The one interface every algorithm implements; the runner knows nothing else."""

from abc import ABC, abstractmethod
from typing import Dict

import torch

from metalearn.data import Episodes, EpisodeSampler
from metalearn.errors import MetalearnError


class Algorithm(ABC):
    model: torch.nn.Module
    needs_queries = True  # meta-training reads the episodes' query sets
    throughput_unit = "tasks"  # what one training batch counts, for the tasks/s (images/s) figure

    def sample(self, sampler: EpisodeSampler, meta_batch_size: int):
        """The next training batch: a meta-batch of episodes unless the algorithm trains on something else."""
        return sampler.sample(meta_batch_size)

    @abstractmethod
    def meta_train_step(self, episodes: Episodes) -> Dict[str, float]:
        """One outer update on a batch of tasks; returns at least loss and accuracy."""

    @abstractmethod
    def predict(self, episodes: Episodes) -> torch.Tensor:
        """Adapt on each support set, return query logits [T, ways*queries, ways]."""

    @abstractmethod
    def state_dict(self) -> dict:
        """Everything needed to resume: plain tensors and containers only."""

    @abstractmethod
    def load_state_dict(self, state: dict) -> None: ...

    def check_resume(self, train_steps: int) -> None:
        """A resumed run is about to train to `train_steps`: refuse, with what to do, what cannot work."""


def load_model_state(model: torch.nn.Module, state: dict, what: str) -> None:
    """Load weights, turning a shape or key mismatch into an error that says which."""
    mine = model.state_dict()
    problems = [f"missing {k}" for k in mine if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in mine]
    problems += [
        f"{k} is {tuple(state[k].shape)} there, {tuple(v.shape)} here"
        for k, v in mine.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        raise MetalearnError(
            f"{what} does not fit this configuration ({'; '.join(problems[:3])}). "
            f"Its model was built with other settings (for MAML, data.ways sets the head's size): "
            f"use the settings it was trained with."
        )
    model.load_state_dict(state)
