"""A dependency-free progress bar: redrawn in place on a terminal, a few plain lines in logs."""

from __future__ import annotations

import sys
import time


class ProgressBar:
    def __init__(self, total: int, desc: str, *, stream=None, width: int = 24, enabled: bool = True):
        self.total = max(total, 1)
        self.desc = desc
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.enabled = enabled
        self.count = 0
        self.start = time.perf_counter()
        self.interactive = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self._next_log_fraction = 0.25  # non-interactive output: a line at 25/50/75/100 %

    def update(self, n: int = 1, status: str = "") -> None:
        self.count += n
        if not self.enabled:
            return
        fraction = min(self.count / self.total, 1.0)
        if self.interactive:
            self.stream.write("\r" + self._line(fraction, status))
            self.stream.flush()
        elif fraction >= self._next_log_fraction:
            self.stream.write(self._line(fraction, status) + "\n")
            self._next_log_fraction = (int(fraction * 4) + 1) / 4

    def close(self, status: str = "") -> None:
        if self.enabled and self.interactive:
            self.stream.write("\r" + self._line(min(self.count / self.total, 1.0), status) + "\n")
            self.stream.flush()

    def _line(self, fraction: float, status: str) -> str:
        filled = int(self.width * fraction)
        elapsed = time.perf_counter() - self.start
        bar = "#" * filled + "-" * (self.width - filled)
        return f"{self.desc} [{bar}] {self.count}/{self.total} {elapsed:6.1f}s {self._rate(elapsed)} {status}"

    def _rate(self, elapsed: float) -> str:
        if self.count == 0 or elapsed <= 0:
            return "-- it/s"
        rate = self.count / elapsed
        return f"{rate:5.1f} it/s" if rate >= 1 else f"{1 / rate:5.1f} s/it"
