"""Progress of a long benchmark run, on stderr (stdout keeps the results table).

On a terminal: a tqdm bar. Into a file or a pipe (CI logs, `tee`): a plain line at most every
`interval` seconds and one at the end, so a log shows the run is alive without carriage
returns or thousands of lines.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, description: str, unit: str, stream: TextIO | None = None,
                 interval: float = 10.0) -> None:
        self.total, self.description, self.unit = total, description, unit
        self.stream = stream or sys.stderr
        self.interval = interval
        self.count = 0
        self._started = self._last = time.monotonic()
        self._bar = None
        if self.stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=description, unit=unit, file=self.stream,
                             dynamic_ncols=True)

    def update(self, count: int = 1) -> None:
        self.count += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            self._line(now)

    def _line(self, now: float) -> None:
        percent = 100 * self.count / self.total if self.total else 100.0
        self.stream.write(f"{self.description}: {self.count}/{self.total} {self.unit} "
                          f"({percent:.0f}%), {now - self._started:.0f} s\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        else:
            self._line(time.monotonic())

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
