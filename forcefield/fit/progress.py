"""Progress lines with an ETA for the long stages of ``oreo fit`` (pool MD, labels, training, committee MD).

A line at most every ``every_s`` seconds (and one at the end), plain text, so a log file shows the run is alive
and when the stage will end.
"""
from __future__ import annotations

import time
from typing import Callable, Optional


def format_duration(seconds: float) -> str:
    """'45 s', '12 min', '3.4 h'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """``advance(n)`` after each unit of work; prints ``what: done/total unit (rate), ETA``."""

    def __init__(self, what: str, total: int, unit: str, log: Callable[[str], None], every_s: float = 30.0,
                 done: int = 0):
        self.what, self.total, self.unit, self.log, self.every_s = what, int(total), unit, log, every_s
        self.start_done = self.done = int(done)
        self.t0 = time.perf_counter()
        self.next_line = self.t0 + every_s

    def eta(self) -> Optional[float]:
        work, elapsed = self.done - self.start_done, time.perf_counter() - self.t0
        if work <= 0 or elapsed <= 0:
            return None
        return (self.total - self.done) * elapsed / work

    def line(self) -> str:
        elapsed = time.perf_counter() - self.t0
        work = self.done - self.start_done
        rate = f", {elapsed / work:.2f} s per {self.unit}" if work > 0 else ""
        eta = self.eta()
        tail = f", ETA {format_duration(eta)}" if eta is not None and self.done < self.total else ""
        return f"{self.what}: {self.done}/{self.total} {self.unit}s{rate}{tail}"

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now >= self.next_line and self.done < self.total:
            self.next_line = now + self.every_s
            self.log(self.line())

    def finish(self) -> None:
        self.log(self.line() + f" (done in {format_duration(time.perf_counter() - self.t0)})")
