"""TensorBoard event files in <run>/tensorboard: every metric per step, the run's config as hparams.

`tensorboard --logdir runs/` shows all runs side by side. On resume the
events after the checkpoint's step are purged (SummaryWriter's purge_step),
as metrics.jsonl drops its lines.
"""

from pathlib import Path

from metalearn.loggers.base import MetricWriter, flat_config

SKIPPED = ("step", "split")


class TensorBoardWriter(MetricWriter):
    def __init__(self, run_dir: Path, log_dir: str = "tensorboard"):
        self.log_dir = Path(run_dir) / log_dir
        self.purge_step: int | None = None
        self.config: dict = {}
        self.best_val = None
        self._writer = None

    def writer(self):
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=self.purge_step)
        return self._writer

    def start(self, config: dict) -> None:
        self.config = flat_config(config)

    def resume(self, step: int) -> None:
        self.purge_step = step + 1

    def write(self, record: dict) -> None:
        for key, value in record.items():
            if key not in SKIPPED and isinstance(value, (int, float)) and value is not None:
                self.writer().add_scalar(f"{record['split']}/{key}", value, record["step"])
        if record["split"] == "val" and (self.best_val is None or record["accuracy"] > self.best_val):
            self.best_val = record["accuracy"]

    def close(self) -> None:
        if self.best_val is not None:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in self.config.items()}
            self.writer().add_hparams(hparams, {"hparam/best_val_accuracy": self.best_val}, run_name=".")
        if self._writer is not None:
            self._writer.close()
