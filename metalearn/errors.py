"""The one exception type for mistakes a user can fix (bad input, missing data)."""


class MetalearnError(Exception):
    """Raised for user-facing problems; the CLI prints the message, no traceback."""
