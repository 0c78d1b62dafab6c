"""The metric writer contract: where a run's training and validation figures go.

A logger is a class with `write(record)`; conf/logger/<name>.yaml names it
with `_target_` under `loggers.<name>` (`# @package loggers.<name>`), and
`metalearn train logger=<name>` (or `logger=[a,b]`) adds it. Each is constructed with the run
folder (`run_dir`) and its YAML's other keys.
"""

from abc import ABC, abstractmethod


class MetricWriter(ABC):
    """Constructed as `Writer(run_dir=<run folder>, **<its YAML's keys>)`."""

    @abstractmethod
    def write(self, record: dict) -> None:
        """One record: {"step": int, "split": "train" or "val", "loss", "accuracy", ...: float, "time": s}."""

    def start(self, config: dict) -> None:
        """The run's resolved config (a nested dict), once before the first record."""

    def resume(self, step: int) -> None:
        """The run resumes from its checkpoint at `step`; records after it will be written again."""

    def close(self) -> None:
        """The run ends (or stops to be resumed later)."""


def flat_config(config: dict, prefix: str = "") -> dict:
    """{"algo.inner_lr": 0.4, ...}: a nested config as dotted keys (for hparams and params)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
