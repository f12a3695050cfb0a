"""Progress of long offline work (training, calibration, evaluation, exports): a bar with counts,
rate and ETA on a terminal (rich), plain periodic lines otherwise (CI logs, pipes, files).

A job names what it counts and how many it expects; the reporter writes to stderr, so a job's
own output (a path, JSON) stays clean on stdout. Off a terminal a line is written at most every
``every_s`` seconds and once at the end, so a log of a 15-minute job holds a few dozen lines,
not a redrawn bar.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TextIO, TypeVar

T = TypeVar("T")


class Progress:
    """``with Progress("calibrate digits", 5000, "images") as p: ... p.advance(64)``.

    ``total`` None: the count and rate only (no bar, no ETA). ``stream``: stderr unless given;
    a bar is drawn only when it is a terminal (``terminal`` overrides, for tests)."""

    def __init__(
        self,
        description: str,
        total: int | None,
        unit: str = "items",
        stream: TextIO | None = None,
        every_s: float = 10.0,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.description, self.total, self.unit = description, total, unit
        self.stream = stream if stream is not None else sys.stderr
        self.every_s, self.clock = every_s, clock
        isatty = getattr(self.stream, "isatty", lambda: False)
        self.terminal = isatty() if terminal is None else terminal
        self.done = 0
        self._started = self._last = 0.0
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> Progress:
        self._started = self._last = self.clock()
        if self.terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            console = Console(file=self.stream, force_terminal=True)
            self._bar = Bar(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn(self.unit),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, count: int = 1) -> None:
        """``count`` more done."""
        self.done += count
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)
            return
        now = self.clock()
        if now - self._last >= self.every_s:
            self._last = now
            self._line(now)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.stop()
            return
        self._line(self.clock(), final=error is None)

    def _line(self, now: float, final: bool = False) -> None:
        self.stream.write(line(self.description, self.done, self.total, self.unit,
                               now - self._started, final) + "\n")  # fmt: skip
        self.stream.flush()


def line(
    description: str, done: int, total: int | None, unit: str, elapsed_s: float, final: bool
) -> str:
    """One plain progress line: counts, share, rate and time left (or taken, when ``final``)."""
    rate = done / elapsed_s if elapsed_s > 0 else 0.0
    count = f"{done:,}" if total is None else f"{done:,}/{total:,}"
    share = f" ({100 * done / total:.0f} %)" if total else ""
    if final:
        return f"{description}: {count} {unit} in {elapsed_s:.0f} s ({rate:,.1f} {unit}/s)"
    left = ""
    if total and rate > 0:
        left = f", about {format_seconds((total - done) / rate)} left"
    return f"{description}: {count} {unit}{share}, {rate:,.1f} {unit}/s{left}"


def format_seconds(seconds: float) -> str:
    """``75`` → ``1 min 15 s``; ``3700`` → ``1 h 2 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def track(
    items: Iterable[T], description: str, total: int | None = None, unit: str = "items",
    **options: Any,
) -> Iterator[T]:  # fmt: skip
    """Yields ``items``, one ``advance`` each (``total`` defaults to ``len(items)``)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(description, total, unit, **options) as progress:
        for item in items:
            yield item
            progress.advance()
