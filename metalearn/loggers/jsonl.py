"""metrics.jsonl in the run folder: one JSON object per line (step, split, loss, accuracy, ...).

Every run writes it (`metalearn eval`, the tests and any later report read
it); the loggers a config adds under `loggers` write alongside it.
"""

import json
from pathlib import Path

from metalearn.loggers.base import MetricWriter
from metalearn.storage.atomic import json_line


class JsonlWriter(MetricWriter):
    def __init__(self, run_dir: Path, filename: str = "metrics.jsonl"):
        self.path = Path(run_dir) / filename

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json_line(record))

    def records(self) -> list:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut short by a crash
        return records

    def resume(self, step: int) -> None:
        """Drop what was logged after the checkpoint a resumed run starts from."""
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json_line(r) for r in kept))
        tmp.replace(self.path)
