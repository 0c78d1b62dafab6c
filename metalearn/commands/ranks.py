"""Under torchrun, `train` and `eval` are one run on several processes: they join before Hydra starts."""

import os
import sys
from pathlib import Path

from omegaconf import DictConfig

from metalearn.errors import MetalearnError
from metalearn.storage.run_folder import override_key, quoted

# Where a process other than rank 0 logs: the console, warnings and errors only.
QUIET_RANK = (
    "hydra.output_subdir=null",
    "hydra.job_logging.handlers.file.filename=/dev/null",
    "hydra.job_logging.root.level=WARNING",
)


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ


def several_processes() -> bool:
    from metalearn import distributed

    return distributed.from_environment().active


def refuse_flags() -> None:
    raise MetalearnError(
        "a run on several processes (torchrun) is one run: drop -m and other flags (--cfg, --help), "
        "or run them without torchrun."
    )


def join_ranks(args: list[str], cfg: DictConfig, run_dir: Path) -> list[str]:
    """Join the process group; every rank runs in rank 0's run folder `run_dir`, and the others write nothing
    there (no .hydra record, no log file)."""
    from metalearn import distributed

    if not distributed.from_environment().active:
        return args
    from metalearn.device import resolve_device

    ranks = distributed.start(resolve_device(cfg.device.name), cfg.device.dist_timeout_s)
    run_dir = ranks.broadcast(str(run_dir) if ranks.main else None)
    replaced = {"hydra.run.dir", *([] if ranks.main else [override_key(q) for q in QUIET_RANK])}
    args = [a for a in args if override_key(a) not in replaced]
    return args + [f"hydra.run.dir={quoted(run_dir)}"] + ([] if ranks.main else list(QUIET_RANK))


def leave_ranks() -> None:
    """After a command on several processes: the ranks leave the process group together (see
    metalearn.distributed.leave_together); nothing to do where no group was joined."""
    if "torch.distributed" not in sys.modules:  # one process: torch's distributed package never loaded
        return
    from metalearn import distributed

    distributed.leave_together()
