"""trial.json of a run that is a trial of an Optuna study: which study and trial, and how it ended."""

import json
from pathlib import Path

TRIAL_FILE = "trial.json"


def pruned_step(run_dir: Path) -> int | None:
    """The step at which the study's pruner stopped the run in `run_dir`; None if it did not."""
    try:
        record = json.loads((Path(run_dir) / TRIAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    step = record.get("step") if isinstance(record, dict) else None
    if record.get("state") != "pruned" or not isinstance(step, int) or isinstance(step, bool):
        return None
    return step
