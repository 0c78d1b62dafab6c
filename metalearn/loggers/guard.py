"""A logger that fails costs the run that logger, not the run: metrics.jsonl still has every record."""

import logging

from metalearn.loggers.base import MetricWriter

log = logging.getLogger(__name__)


def reason(err: BaseException, limit: int = 300) -> str:
    """ "OSError: [Errno 28] No space left on device": the error's type and first line, cut at `limit`."""
    text = str(err).strip()
    line = f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__
    return line if len(line) <= limit else line[:limit] + "..."


class GuardedWriter(MetricWriter):
    """Passes every call on to `writer` until one raises; then warns once and passes on nothing more."""

    def __init__(self, name: str, writer: MetricWriter):
        self.name, self.writer = name, writer
        self.failed = False

    def _call(self, method: str, *args) -> None:
        if self.failed:
            return
        try:
            getattr(self.writer, method)(*args)
        except Exception as err:
            self.failed = True
            log.warning(
                "logger=%s failed (%s, in %s.%s): it is off for the rest of this run; metrics.jsonl keeps every record",
                self.name,
                reason(err),
                type(self.writer).__name__,
                method,
            )

    def write(self, record: dict) -> None:
        self._call("write", record)

    def start(self, config: dict) -> None:
        self._call("start", config)

    def resume(self, step: int) -> None:
        self._call("resume", step)

    def close(self) -> None:
        self._call("close")
