"""Progress of long work, the same everywhere: curation, training, merging, evaluation, search.

On a terminal it is a tqdm bar with the rate and the time left. Anywhere else (a pipeline pod, CI,
stderr sent to a file) it is one INFO line through demix's logging channel per interval
(DEMIX_PROGRESS_INTERVAL seconds, 30 by default) and one at the end; work that ends within its
first interval writes nothing, so short loops stay quiet. Every loop calls `progress` or `track`.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

from tqdm import tqdm

from demix.errors import ConfigError

log = logging.getLogger(__name__)

INTERVAL_ENV = "DEMIX_PROGRESS_INTERVAL"
DEFAULT_INTERVAL_S = 30.0
# A bar appears only once its work has taken this long (a merge of a tiny model shows none).
BAR_DELAY_S = 2.0

T = TypeVar("T")
# The clock of the progress lines (a test sets its own).
CLOCK: Callable[[], float] = time.monotonic


def interval_s() -> float:
    """Seconds between two progress lines off a terminal: DEMIX_PROGRESS_INTERVAL, else 30.

    Raises ConfigError naming the variable when it is not a positive number.
    """
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"{INTERVAL_ENV}={raw!r}: expected a positive number of seconds")
    return value


class Progress:
    """Progress of one piece of work; `progress` returns the kind that fits where it runs."""

    def update(self, n: int = 1) -> None:
        """Count `n` more units done."""

    def set_postfix(self, **values) -> None:
        """Values shown after the count (loss, tokens/s), until set again."""

    def close(self) -> None:
        """The work ended (or stopped): end the bar or write the last line."""

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _amount(n: float, unit: str) -> str:
    """`12.3MB` for bytes (unit "B"), else the number: `30`, `2.5`, `12,345`."""
    if unit == "B":
        return tqdm.format_sizeof(n, "B")
    return f"{n:.3g}" if abs(n) < 1000 else f"{n:,.0f}"


class _Bar(Progress):
    """A tqdm bar on a terminal: count, rate and time left (bytes scaled: kB, MB, GB)."""

    def __init__(self, total: int | None, desc: str, unit: str, initial: int, stream: TextIO):
        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=desc,
            unit=unit,
            file=stream,
            unit_scale=unit == "B",
            dynamic_ncols=True,
            mininterval=1.0,
            delay=BAR_DELAY_S,
        )

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def set_postfix(self, **values) -> None:
        self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.bar.close()


class LogLines(Progress):
    """One log line per `interval` seconds of `clock` (and one at the end when any was written):
    `train base base: 120/400 step (30%), 4.10 step/s, 1:08 left, loss=3.210`."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str,
        initial: int = 0,
        interval: float = DEFAULT_INTERVAL_S,
        clock: Callable[[], float] | None = None,
    ):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.clock = clock or CLOCK
        self.n = self.initial = initial
        self.start = self.last = self.clock()
        self.postfix: dict = {}
        self.lines = 0
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._line(now)

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def close(self) -> None:
        if not self.closed and self.lines:
            self._line(self.clock(), end=True)
        self.closed = True

    def _line(self, now: float, end: bool = False) -> None:
        elapsed = now - self.start
        rate = (self.n - self.initial) / elapsed if elapsed > 0 else 0.0
        unit = "" if self.unit == "B" else f" {self.unit}"
        count = _amount(self.n, self.unit)
        if self.total:
            count += f"/{_amount(self.total, self.unit)}{unit} ({100 * self.n / self.total:.0f}%)"
        else:
            count += unit
        parts = [f"{self.desc}: {count}", f"{_amount(rate, self.unit)}{unit}/s"]
        if end:
            parts.append(f"done in {tqdm.format_interval(elapsed)}")
        elif self.total and rate > 0:
            parts.append(f"{tqdm.format_interval((self.total - self.n) / rate)} left")
        parts += [f"{key}={value}" for key, value in self.postfix.items()]
        log.info(", ".join(parts))
        self.lines += 1


def progress(
    total: int | None,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    stream: TextIO | None = None,
) -> Progress:
    """The progress of `total` units of work named `desc`: a bar when `stream` (stderr) is a
    terminal, else log lines every DEMIX_PROGRESS_INTERVAL seconds; nothing when `disable`.

    Raises ConfigError for a DEMIX_PROGRESS_INTERVAL that is not a positive number.
    """
    if disable:
        return Progress()
    stream = stream or sys.stderr
    if stream.isatty():
        return _Bar(total, desc, unit, initial, stream)
    return LogLines(total, desc, unit, initial, interval_s())


def track(
    items: Iterable[T], desc: str, unit: str = "it", total: int | None = None, **kwargs
) -> Iterator[T]:
    """Yield `items`, counting each one done in a `progress` (total: len(items) when it has one)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress(total, desc, unit, **kwargs) as bar:
        for item in items:
            yield item
            bar.update()
