"""Metric writers: metrics.jsonl always, plus the loggers the config names under `loggers`."""

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from metalearn.errors import MetalearnError
from metalearn.loggers.base import MetricWriter
from metalearn.loggers.guard import GuardedWriter
from metalearn.loggers.jsonl import JsonlWriter


def build_writers(loggers: DictConfig, run_dir: Path) -> list[MetricWriter]:
    """metrics.jsonl first, then each configured logger, constructed with the run folder.

    A logger that cannot be built stops the run before it starts; one that fails later is switched off
    with a warning (GuardedWriter), since metrics.jsonl holds every record anyway.
    """
    writers: list[MetricWriter] = [JsonlWriter(run_dir)]
    for name, node in (loggers or {}).items():
        try:
            writer = instantiate(node, run_dir=run_dir)
        except Exception as err:
            cause = err.__cause__ or err
            if isinstance(cause, MetalearnError):  # the logger's own message says what to do
                raise cause from None
            if isinstance(cause, ImportError):
                raise MetalearnError(
                    f'logger={name} needs the loggers extra ({cause}): pip install ".[loggers]".'
                ) from None
            reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
            raise MetalearnError(f"loggers.{name} cannot be built ({reason}).") from None
        if not isinstance(writer, MetricWriter):
            raise MetalearnError(f"loggers.{name}: {type(writer).__name__} is not a metalearn MetricWriter.")
        writers.append(GuardedWriter(name, writer))
    return writers


__all__ = ["GuardedWriter", "JsonlWriter", "MetricWriter", "build_writers"]
