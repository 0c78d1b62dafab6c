"""Fixtures: the tiny generated Omniglot, overrides for a tiny run, and the in-process CLI."""

import pytest
import torch
from helpers.cli import metalearn_in_process
from helpers.data import write_tiny_omniglot, write_tiny_split


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict:
    """A generated Omniglot under root/, its split folder, and a cache folder."""
    base = tmp_path_factory.mktemp("tiny")
    root = write_tiny_omniglot(base / "root")
    split = write_tiny_split(base / "split")
    return {"root": root, "split": split, "cache": base / "cache"}


@pytest.fixture
def tiny_overrides(tiny_data) -> list:
    """Overrides for a fast CLI run on the tiny data (a few steps, tiny validation)."""
    return [
        f"data.root={tiny_data['root']}",
        f"data.split={tiny_data['split']}",
        f"data.cache_dir={tiny_data['cache']}",
        "task.queries=3",
        "model.hidden=8",
        "algo.inner_steps_eval=2",
        "train.steps=4",
        "train.meta_batch_size=2",
        "train.val_every=2",
        "train.val_episodes=4",
        "train.ckpt_every=2",
        "train.log_every=1",
        "eval.episodes=10",
        "device=cpu",
    ]


@pytest.fixture
def cli():
    return metalearn_in_process


@pytest.fixture(scope="module")
def one_thread():
    """Tensors this small run fastest on one thread; a second one only contends for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
