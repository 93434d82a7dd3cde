"""A small progress display: problems done / total, rate and ETA, on stderr.

On a terminal the line is rewritten in place (carriage return); elsewhere (logs, CI) a
plain line is printed at most every ``interval_s`` seconds, when forced, and at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TextIO


def format_duration(seconds: float) -> str:
    """``m:ss`` below an hour, else ``h:mm:ss``."""
    s = max(0, round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Counts finished problems out of ``total`` and reports them on ``stream``."""

    def __init__(
        self,
        total: int,
        *,
        stream: TextIO | None = None,
        tty: bool | None = None,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        prefix: str = "[eval]",
    ) -> None:
        self.total = total
        self.done = 0
        self.note = ""
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.tty = tty if tty is not None else bool(isatty and isatty())
        self.interval_s = interval_s
        self.clock = clock
        self.prefix = prefix
        self.start = clock()
        self._last_print: float | None = None
        self._width = 0

    def line(self) -> str:
        """The current status: ``done/total (pct), rate/s, elapsed, ETA`` and the note."""
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100 * self.done / self.total if self.total else 100.0
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        note = f" {self.note}" if self.note else ""
        return (
            f"{self.prefix}{note} {self.done}/{self.total} problems ({pct:.0f}%), "
            f"{rate:.2f}/s, elapsed {format_duration(elapsed)}, ETA {eta}"
        )

    def set_note(self, note: str) -> None:
        """Change the label shown before the counts (e.g. the task and length under way)."""
        self.note = note

    def advance(self, n: int = 0, *, force: bool = False) -> None:
        """Count ``n`` more finished problems and show the status when due."""
        self.done = min(self.total, self.done + n)
        now = self.clock()
        if self.tty:
            text = self.line()
            pad = " " * max(0, self._width - len(text))
            self._width = len(text)
            self.stream.write("\r" + text + pad)
            self.stream.flush()
            return
        due = self._last_print is None or now - self._last_print >= self.interval_s
        if force or due or self.done >= self.total:
            self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._last_print = now

    def close(self) -> None:
        """End the display (a final newline on a terminal)."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
