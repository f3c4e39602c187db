"""The one logging channel: every demix module logs through `logging`; the CLI and the pipeline
components call `configure_logging` once, which sends demix's records to stderr.

Progress (stages, rounds, proxies) is INFO, shown as `[demix] message`; warnings as
`demix: warning: message`. Long loops report through demix.progress (a bar on a terminal, these
lines elsewhere). Other libraries' records stay at WARNING unless `verbose`.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm


class _Stderr(logging.StreamHandler):
    """A handler writing to whatever sys.stderr is when a record is emitted."""

    def __init__(self) -> None:
        super().__init__()

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns one; sys.stderr wins
        pass

    def emit(self, record: logging.LogRecord) -> None:
        # a progress bar on the terminal is cleared, the line written, the bar drawn again
        with tqdm.external_write_mode(file=sys.stderr):
            super().emit(record)


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"demix: {record.levelname.lower()}: {message}"
        return f"[demix] {message}"


def configure_logging(verbose: bool = False) -> None:
    """Send demix's log records (INFO and up; DEBUG when verbose) to stderr, once per process."""
    logger = logging.getLogger("demix")
    for handler in list(logger.handlers):
        if isinstance(handler, _Stderr):
            logger.removeHandler(handler)
    handler = _Stderr()
    handler.setFormatter(_Format())
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logger.propagate = False
    if verbose:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
