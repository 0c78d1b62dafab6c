"""One writer per run folder: the process that trains a run holds an exclusive lock on <run>/.lock.

The lock is fcntl.flock's, so the kernel releases it when its process ends, however it ends: a
.lock file left by a killed process blocks nothing. While held, the file names its holder (pid,
host, start time, command) for the error a second writer gets. The holder removes the file when
it releases the lock; a process that then locks a file already removed tries again on a new one,
so two processes never hold locks on two different files of one folder.
"""

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from metalearn.errors import MetalearnError

LOCK_NAME = ".lock"
# Filesystems without locks (some network mounts): the run goes on unlocked rather than not at all.
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)

_held: dict[str, int] = {}  # run folder (real path) -> the descriptor of its locked .lock


def _key(folder: Path) -> str:
    return os.path.realpath(folder)


def holds(folder: Path) -> bool:
    """This process holds the folder's lock."""
    return _key(folder) in _held


def lock_run(folder: Path, command: str | None = None) -> None:
    """Make this process the folder's one writer until release(), or raise an error naming the holder."""
    key = _key(folder)
    if key in _held:
        return
    while True:
        path = Path(key) / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise MetalearnError(
                f"cannot write {path} ({err.strerror or err}), so the run folder cannot be locked for this process. "
                f"Nothing was changed; make the folder writable and run the command again."
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in NO_LOCKS:
                note = f"metalearn: note: {folder} cannot be locked here ({err.strerror}); run one writer at a time."
                print(note, file=sys.stderr)
                return
            raise MetalearnError(_busy_message(folder, path)) from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder before removed this file as it released it: lock the one there now
    _write_holder(fd, command)
    _held[key] = fd


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _write_holder(fd: int, command: str | None) -> None:
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now().isoformat(timespec="seconds"),
        "command": command or shlex.join(sys.argv),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)


def _busy_message(folder: Path, path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        who = f"process {holder['pid']} on {holder['host']}, started {holder['started']}: {holder['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "another process, which has not yet written its name in it"
    return (
        f"{folder} is in use by {who} (it holds {path}). A run folder has one writer at a time: wait for that "
        f"process to end, or stop it, then run the command again. Nothing of the run was changed."
    )


def release(folder: Path) -> None:
    """Give the folder's lock up (removing its file first, so no other process is left holding a stale one)."""
    fd = _held.pop(_key(folder), None)
    if fd is None:
        return
    try:
        (Path(_key(folder)) / LOCK_NAME).unlink(missing_ok=True)
    except OSError:
        pass  # a folder that no longer takes writes: the lock itself still goes with the descriptor
    os.close(fd)


@contextmanager
def one_writer(folder: Path) -> Iterator[None]:
    """The folder's lock for the block, unless this process holds it already (then it keeps it)."""
    if holds(folder):
        yield
        return
    lock_run(folder)
    try:
        yield
    finally:
        release(folder)
