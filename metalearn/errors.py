"""The exception types for mistakes a user can fix (bad input, missing data)."""

from hydra.errors import CompactHydraException


class MetalearnError(Exception):
    """Raised for user-facing problems; the CLI prints the message, no traceback."""


class RunFailed(MetalearnError, CompactHydraException):
    """One run of a sweep stopped with a MetalearnError: its message, prefixed with the run's folder.

    An exception, not an exit, so the sweep goes on: Hydra records the job as failed, an
    Optuna trial counts as failed, and Hydra prints this message alone (no traceback) when
    it reports the failure at the end.
    """
