"""The storage of an Optuna study (hydra.sweeper.storage), opened before the study starts: a file that is not
a study's ends on one line that names it; trials a stopped process left running are found.

Each trial records the process that asked for it (host and process id), so that a study started again tells
a trial whose process is gone from one another live worker on the same file is running.
"""

import contextlib
import logging
import os
import socket
import sqlite3
from pathlib import Path

from metalearn.errors import RunFailed

log = logging.getLogger(__name__)

OWNER = "metalearn:asked_by"  # a trial's system attribute: {"host": ..., "pid": ...}
OPTUNA_TABLES = {"studies", "version_info"}  # in every study file Optuna writes


def open_storage(url: str):
    """The study's storage, checked, recording in each trial it starts which process asked for it."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    refuse_foreign_sqlite(url)
    try:
        storage = optuna.storages.get_storage(url)
    except (SQLAlchemyError, optuna.exceptions.OptunaError, RuntimeError, ValueError, OSError) as err:
        raise storage_error(
            url,
            f"cannot be opened ({_first_line(err)})",
            "check hydra.sweeper.storage (sqlite:///<file>.db keeps a study in a file); a damaged file: restore it "
            "from a copy, or start the study in a new file",
        ) from None
    return TrialsWithOwner(storage, url)


def storage_error(url: str, what: str, todo: str) -> RunFailed:
    return RunFailed(f"metalearn: error: the study's storage {url} {what}. Nothing was changed: {todo}.")


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:200]


def refuse_foreign_sqlite(url: str) -> None:
    """An SQLite file that is no database, or the database of another program: Optuna would fail on the first,
    and add its tables to the second."""
    if not url.startswith("sqlite:///"):
        return
    path = Path(url[len("sqlite:///") :])
    if not path.is_file() or path.stat().st_size == 0:
        return  # a new study's file
    try:
        with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as err:
        raise storage_error(
            url,
            f"is not an SQLite database ({err}): it was damaged or is another kind of file",
            "restore it from a copy, or give hydra.sweeper.storage a new file (a new study)",
        ) from None
    if tables and not OPTUNA_TABLES <= tables:
        raise storage_error(
            url,
            f"is the SQLite database of another program (tables {', '.join(sorted(tables)[:5])}), not an Optuna "
            f"study's",
            "give hydra.sweeper.storage another file",
        )


def this_process() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def left_by_stopped_process(owner: dict | None) -> bool:
    """Whether a running trial's process is gone: one of this machine that no longer runs (or that is this
    process, which has asked for no trial yet), or one that recorded none (asked through Optuna itself)."""
    if not isinstance(owner, dict):
        return True
    if owner.get("host") != socket.gethostname():
        return False  # another machine's process: it cannot be checked from here
    if owner.get("pid") == os.getpid():
        return True  # the id of the process that asked was given again, to this one (a restarted container)
    try:
        os.kill(int(owner.get("pid")), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError, OverflowError):
        return False
    return False


def stale_trials(storage, study_id: int) -> list:
    """Trials of the study left running by a process that stopped (killed, or its machine restarted): nothing
    will end them, and a running trial stays running in the study forever."""
    from optuna.trial import TrialState

    stale = []
    for trial in storage.get_all_trials(study_id, deepcopy=False):
        if trial.state != TrialState.RUNNING:
            continue
        owner = trial.system_attrs.get(OWNER)
        if left_by_stopped_process(owner):
            stale.append(trial)
        else:
            log.info("trial %d runs in process %s: left running", trial.number, owner)
    return stale


def record_owner(storage, trial_id: int) -> None:
    storage.set_trial_system_attr(trial_id, OWNER, this_process())


class TrialsWithOwner:
    """A study's storage that records, in each trial it starts, which process asked for it (OWNER)."""

    def __init__(self, storage, url: str) -> None:
        self._storage, self._url = storage, url

    def __getattr__(self, name: str):
        return getattr(self._storage, name)

    def __str__(self) -> str:  # the sweeper logs its storage
        return self._url

    def create_new_trial(self, study_id: int, template_trial=None) -> int:
        trial_id = self._storage.create_new_trial(study_id, template_trial)
        self._record_owner(trial_id)
        return trial_id

    def set_trial_state_values(self, trial_id: int, state, values=None) -> bool:
        taken = self._storage.set_trial_state_values(trial_id, state, values)
        if taken and state.name == "RUNNING":
            self._record_owner(trial_id)
        return taken

    def _record_owner(self, trial_id: int) -> None:
        from optuna.trial import TrialState

        if self._storage.get_trial(trial_id).state == TrialState.RUNNING:
            record_owner(self._storage, trial_id)
