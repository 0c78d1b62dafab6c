"""`metalearn train [overrides]`: a new run in its own folder, `resume=<run>`, or a sweep (-m).

A new run's folder is resolved once, checked, made and locked before Hydra writes anything there, and a
run refused before it starts leaves no folder behind. A resume replays the run's saved overrides
(.hydra/overrides.yaml) before the new ones and takes the run's lock.
"""

import contextlib
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from metalearn.commands.common import CONFIG_PATH, has_flags, main_process, resolved_run_dir, user_errors_exit
from metalearn.errors import MetalearnError
from metalearn.export.format import is_export
from metalearn.storage.run_folder import (
    NewRunFolder,
    find_override,
    override_key,
    quoted,
    refuse_existing_run,
    refuse_long_names,
    replay_run_overrides,
)
from metalearn.storage.run_lock import lock_run, release

CONFIG_NAME = "train"


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=CONFIG_NAME)
@user_errors_exit
def app(cfg: DictConfig):
    """One run; returns its best validation accuracy (an Optuna study's objective), None if none was scored,
    or where the study's pruner stopped it (study_trial.Pruned)."""
    from hydra.core.hydra_config import HydraConfig

    from metalearn.storage.run_lock import one_writer
    from metalearn.train import train

    if not main_process():  # rank 0 alone writes the run folder
        return outcome(train(cfg))
    # A single run's lock was taken in `claim` already; a sweep's run takes its folder's here.
    with one_writer(Path(HydraConfig.get().runtime.output_dir)):
        return outcome(train(cfg))


def outcome(result):
    from metalearn.study_trial import Pruned

    if result.pruned_at is not None:
        return Pruned(result.pruned_at, result.best_val_accuracy)
    return result.best_val_accuracy


def prepare(args: list[str], claims: contextlib.ExitStack, command_line: str) -> list[str]:
    """The overrides of a resume (the run's own, then these) with the run locked; a new run's as given."""
    _register_study_sweeper()
    study = find_override(args, "hparams_search")
    if study is not None and not has_flags(args):
        raise MetalearnError(
            f"hparams_search={study} runs an Optuna study, a sweep: add -m "
            f"(metalearn train -m hparams_search={study} ...)."
        )
    run = find_override(args, "resume")
    if run is None:
        return args
    if is_export(run.strip("'\"")):
        raise MetalearnError(
            f"resume={run} is an exported file, which holds the weights alone: resume takes the run folder it "
            f"was exported from; `metalearn eval run={run}` scores the file."
        )
    folder = Path(run.strip("'\""))
    _writable(folder / "train.log")
    replayed = replay_run_overrides(run, args, drop=("resume",))
    if main_process():  # before Hydra appends to the run's log
        lock_run(folder, command_line)
        claims.callback(release, folder)
    # Hydra must not rewrite the run's record before the resume is accepted: train() writes it then.
    return replayed + [f"resume={quoted(run)}", f"hydra.run.dir={quoted(run)}", "hydra.output_subdir=null"]


def claim(cfg: DictConfig, args: list[str], claims: contextlib.ExitStack, command_line: str) -> list[str]:
    """A new run's folder (from the composed config), checked, made and locked in `claims`; given to Hydra
    as a literal folder. A resume was claimed in `prepare`."""
    if find_override(args, "resume") is not None:
        return args
    folder = resolved_run_dir(cfg)
    refuse_long_names(folder)
    finishing = cfg.existing_run == "resume"  # the folder may hold this run: it goes on (train checks it is this run)
    if not finishing:
        refuse_existing_run(folder)  # before anything is written there
    if main_process():  # rank 0 makes and locks the folder; the other ranks get its name from rank 0
        new = NewRunFolder(folder)
        claims.push(_discard_if_failed(new))
        _can_create(folder)
        lock_run(folder, command_line)
        new.owned = True  # what appears in it from now on is this process's
        claims.callback(release, folder)
        if not finishing:
            refuse_existing_run(folder)  # again: a run may have finished there since, before this process had the lock
    return [a for a in args if override_key(a) != "hydra.run.dir"] + [f"hydra.run.dir={quoted(str(folder))}"]


def _discard_if_failed(new: NewRunFolder):
    """An exit handler: a command that fails leaves the new run's folder as it found it."""

    def on_exit(kind, err: BaseException | None, trace) -> bool:
        if err is not None and not (isinstance(err, SystemExit) and err.code in (0, None)):
            new.discard()
        return False  # the error goes on

    return on_exit


def _can_create(folder: Path) -> None:
    """A new run's folder can be made and written, before Hydra tries."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise MetalearnError(
            f"cannot write in {folder} ({err.strerror or err}): a run needs a writable folder. Run from a "
            f"writable directory or choose one with hydra.run.dir=<folder>."
        ) from None


def _writable(log: Path) -> None:
    """Refuse, before Hydra opens it, a run folder whose log cannot be written."""
    if not log.parent.is_dir():
        return  # not a run folder: the replay says so
    try:
        with open(log, "a"):
            pass
    except OSError as err:
        raise MetalearnError(
            f"cannot write {log} ({err.strerror or err}), so metalearn cannot resume the run in that folder. "
            f"Nothing was changed; make the folder writable (or copy it somewhere writable) and run the "
            f"command again."
        ) from None


def _register_study_sweeper() -> None:
    """hparams_search's sweeper, known to Hydra however metalearn was installed (an editable install's
    hydra_plugins folder is not scanned), by Hydra's documented manual registration."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.metalearn_study.optuna_study import OptunaStudy

    Plugins.instance().register(OptunaStudy)
