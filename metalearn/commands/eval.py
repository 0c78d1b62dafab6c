"""`metalearn eval run=<run folder | file.safetensors | [run,run,...]>`: score a run on test episodes.

The run's saved overrides are replayed before the ones given here, so its own config is composed again
and any override given now wins. An ensemble's members are composed each in evaluate().
"""

import contextlib
import os
import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from metalearn.commands.common import CONFIG_PATH, HELP_FLAGS, user_errors_exit
from metalearn.errors import MetalearnError
from metalearn.export.format import is_export, record_folder
from metalearn.storage.run_folder import (
    find_override,
    override_key,
    quoted,
    replay_run_overrides,
    run_list,
    saved_overrides,
)

CONFIG_NAME = "eval"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
@user_errors_exit
def app(cfg: DictConfig) -> None:
    from metalearn.evaluate import evaluate

    evaluate(cfg)


def prepare(args: list[str], claims: contextlib.ExitStack, command_line: str) -> list[str]:
    run = required_run(args, "eval")
    if run is None:
        return args
    members = run_list(run)
    if len(members) == 1:
        run = members[0]
        replayed = replay_run_overrides(run, args, drop=("run", "resume")) + [f"run={quoted(run)}", *_eval_log(run)]
        return replayed + ([f"hydra.run.dir={quoted(str(record_folder(run)))}"] if is_export(run) else [])
    # An ensemble: each member's config is composed in evaluate(); its log goes to the first.
    for member in members:
        saved_overrides(member)  # each folder must be a run
    given = [a for a in args if override_key(a) != "run"]
    lead = quoted(str(record_folder(members[0])))
    return given + [f"run=[{','.join(quoted(m) for m in members)}]", f"hydra.run.dir={lead}"]


def required_run(args: list[str], command: str) -> str | None:
    """The run= a command reads; None where Hydra answers a flag without one (--help, --cfg); else an error."""
    run = find_override(args, "run")
    if run is None and not any(a in HELP_FLAGS or a.startswith("--cfg") for a in args):
        raise MetalearnError(f"{command} needs a run folder: metalearn {command} run=<run folder>.")
    return run


def _eval_log(run: str) -> list[str]:
    """Evaluation logs to <run>/eval.log; a run folder that cannot take it logs to a temporary file instead."""
    log = record_folder(run) / "eval.log"
    try:
        with open(log, "a"):
            pass
        return []
    except OSError as err:
        elsewhere = Path(tempfile.gettempdir()) / f"metalearn-eval-{os.getpid()}.log"
        print(f"metalearn: note: cannot write {log} ({err.strerror or err}); logging to {elsewhere}", file=sys.stderr)
        return [f"hydra.job_logging.handlers.file.filename={quoted(str(elsewhere))}"]
