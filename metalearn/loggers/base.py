"""The metric writer contract: where a run's training and validation figures go.

A logger is a class with `write(record)`; conf/logger/<name>.yaml names it
with `_target_` under `loggers.<name>` (`# @package loggers.<name>`), and
`metalearn train +logger=<name>` adds it. Each is constructed with the run
folder (`run_dir`) and its YAML's other keys.
"""

from abc import ABC, abstractmethod


class MetricWriter(ABC):
    """Constructed as `Writer(run_dir=<run folder>, **<its YAML's keys>)`."""

    @abstractmethod
    def write(self, record: dict) -> None:
        """One record: {"step": int, "split": "train" or "val", "loss", "accuracy", ...: float, "time": s}."""

    def resume(self, step: int) -> None:
        """The run resumes from its checkpoint at `step`; records after it will be written again."""

    def close(self) -> None:
        """The run ends (or stops to be resumed later)."""
