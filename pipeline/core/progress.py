"""Progress of long stages: a tqdm bar on a terminal; elsewhere (Spark driver logs, Kubernetes
pods, nohup) a log line at a fixed interval with done/total, rate and ETA, since a bar that
redraws itself is noise in a log file and nothing at all where tqdm hides it.

``PRIMER_PROGRESS`` chooses: ``bar``, ``log`` or ``off`` (default: ``bar`` when stderr is a
terminal, else ``log``); ``PRIMER_PROGRESS_INTERVAL`` sets the log interval in seconds.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

log = logging.getLogger("primer.progress")

DEFAULT_INTERVAL_S = 30.0


def mode() -> str:
    """``bar``, ``log`` or ``off`` for this process."""
    chosen = os.environ.get("PRIMER_PROGRESS", "").strip().lower()
    if chosen in ("bar", "log", "off"):
        return chosen
    return "bar" if sys.stderr.isatty() else "log"


class LogProgress:
    """tqdm's interface (``update``, ``close``, iteration, a context manager) as log lines:
    one every ``interval`` seconds while work goes on, and one at the end."""

    def __init__(
        self,
        iterable: Iterable | None = None,
        total: int | None = None,
        desc: str = "",
        unit: str = "it",
        interval: float | None = None,
    ):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.desc, self.unit = total, desc or "progress", unit
        env = os.environ.get("PRIMER_PROGRESS_INTERVAL", "")
        self.interval = interval if interval is not None else float(env or DEFAULT_INTERVAL_S)
        self.n = 0
        self.disable = False
        self._t0 = self._last = time.monotonic()
        self._closed = False

    def line(self) -> str:
        """``desc: done/total unit (rate/s, ETA)``."""
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        rate = self.n / elapsed
        done = f"{self.n}/{self.total}" if self.total is not None else f"{self.n}"
        text = f"{self.desc}: {done} {self.unit} ({rate:.3g} {self.unit}/s"
        if self.total is not None and rate > 0 and self.n < self.total:
            text += f", ETA {_duration((self.total - self.n) / rate)}"
        return text + f", {_duration(elapsed)} elapsed)"

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.info("%s", self.line())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self.n:
                log.info("%s", self.line())

    def __iter__(self) -> Iterator:
        for item in self.iterable or ():
            yield item
            self.update()
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    **tqdm_kwargs: Any,
):
    """A progress bar (tqdm) on a terminal, log lines elsewhere (:class:`LogProgress`); nothing
    with ``disable`` or ``PRIMER_PROGRESS=off``. Use it as tqdm is used."""
    m = mode()
    if disable or m == "off":
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True)
    if m == "log":
        return LogProgress(iterable, total, desc, unit)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=False, **tqdm_kwargs)
