"""Small float64 models, task batches and comparisons for the naive reference tests of the algorithms."""

import torch
from torch import nn

from metalearn.data import ClassSplit, EpisodeSampler

WAYS = 3


class TinyNet(nn.Module):
    """conv-BN-ReLU-pool twice, then a linear head (identity with num_classes=0); 28x28 -> `hidden`."""

    def __init__(self, num_classes: int, hidden: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, hidden, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(hidden, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden, track_running_stats=False),
            nn.ReLU(),
            nn.MaxPool2d(7),
            nn.Flatten(),
        )
        self.head = nn.Linear(hidden, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x):
        return self.head(self.features(x))


def tiny(num_classes=WAYS, seed=0, dtype=torch.float64, hidden=4):
    torch.manual_seed(seed)
    return TinyNet(num_classes, hidden).to(dtype)


def episodes(tasks=3, shots=2, queries=2, ways=WAYS, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    split = ClassSplit(
        torch.randint(0, 256, (6 * 8, 1, 28, 28), generator=g, dtype=torch.uint8),
        torch.arange(6).repeat_interleave(8),
        "random",
    )
    return EpisodeSampler(split, ways, shots, queries, "cpu", seed=seed, dtype=dtype).sample(tasks)


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_dicts_close(got, expected, tol=1e-10):
    """Equal up to `tol` relative to the largest entry of `expected`."""
    assert got.keys() == expected.keys()
    scale = max(v.abs().max() for v in expected.values())
    for name in expected:
        assert (got[name] - expected[name]).abs().max() / scale < tol, name


def mean_over_tasks(per_task):
    return {n: torch.stack([g[n] for g in per_task]).mean(dim=0) for n in per_task[0]}
