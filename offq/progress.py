"""Progress of long work: a bar with ETA on a terminal, a log line every few seconds off one.

Quantizing, evaluating and benchmarking take minutes. On a terminal a tqdm bar shows the rate and
the ETA; when stderr is a file or a pipe (CI, ``nohup``, a pipeline) a bar would print nothing
useful until the end, so the same progress goes to the ``offq`` logger as one INFO line per stage
every ``interval`` seconds (and one when the stage ends)::

    offq.progress: quantize layers: 12/30 (40%), 81.2 s elapsed, ETA 121.8 s

``show``: True forces the bar, False shows nothing (``--quiet``), None (the default) picks the bar
on a terminal and log lines otherwise.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

__all__ = ["Progress", "track", "LOG_INTERVAL_S"]

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 5.0  # seconds between log lines when not on a terminal
T = TypeVar("T")


class Progress:
    """One stage's progress: ``update(n)`` as work completes; use as a context manager.

    Args:
        total: units of work in the stage (layers, tokens, ...).
        desc: the stage's name, first word of every line.
        unit: the unit's name (shown by the bar).
        show: True = bar, False = silent, None = bar on a TTY, log lines otherwise.
        interval: seconds between log lines.
    """

    def __init__(self, total: int, desc: str, *, unit: str = "it", show: bool | None = None,
                 interval: float = LOG_INTERVAL_S) -> None:
        self.total = int(total)
        self.desc = desc
        self.done = 0
        self.interval = float(interval)
        self._postfix = ""
        self._start = time.perf_counter()
        self._last_log = self._start
        self._bar = None
        tty = sys.stderr.isatty()
        self._log_lines = show is None and not tty
        if show or (show is None and tty):
            from tqdm.auto import tqdm
            self._bar = tqdm(total=self.total, desc=desc, unit=unit, unit_scale=unit != "it",
                             dynamic_ncols=True, smoothing=0.1)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(finished=exc[0] is None)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def set_postfix(self, text: str) -> None:
        """A short status (e.g. the running perplexity) shown after the counts."""
        self._postfix = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
        elif self._log_lines:
            now = time.perf_counter()
            # the last unit's line is close()'s "(done)" line
            if now - self._last_log >= self.interval and self.done < self.total:
                self._last_log = now
                log.info("%s", self.line())

    def line(self) -> str:
        """``desc: done/total (pct), elapsed, ETA`` (the log line)."""
        elapsed = self.elapsed
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.desc}: {self.done}/{self.total} ({pct:.0f}%), {elapsed:.1f} s elapsed"
        if 0 < self.done < self.total:
            text += f", ETA {elapsed * (self.total - self.done) / self.done:.1f} s"
        return text + (f", {self._postfix}" if self._postfix else "")

    def close(self, *, finished: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self._log_lines and finished:
            log.info("%s (done)", self.line())
            self._log_lines = False


def track(items: Iterable[T], desc: str, *, total: int | None = None, unit: str = "it",
          show: bool | None = None) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` (``total`` defaults to ``len(items)``)."""
    n = total if total is not None else len(items)  # type: ignore[arg-type]
    with Progress(n, desc, unit=unit, show=show) as p:
        for item in items:
            yield item
            p.update()
