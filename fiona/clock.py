"""Injectable clocks.

Daemons (forwarder, assigner, arrival detector, indexer) take a `Clock` so tests
can check time-based rules (back-off, quiet periods, sweeps) by advancing a
`FakeClock` instead of sleeping. Production code uses `SystemClock`.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta
from typing import Protocol


class Clock(Protocol):
    """What a daemon may ask about time."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards (intervals, back-off)."""

    def now(self) -> datetime:
        """Local wall-clock time, naive, as stored in the control plane."""

    def time(self) -> float:
        """Wall-clock seconds since the epoch (compare with file mtimes)."""

    def sleep(self, seconds: float) -> None:
        """Wait `seconds` (a blocking retry's pause, see `fiona.backoff`)."""


class SystemClock:
    """The real clocks of the machine."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now()

    def time(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class FakeClock:
    """A clock that only moves when a test calls `advance`.

    Wall time and monotonic time advance together, so rules that mix both
    (a back-off measured monotonically, a timestamp written to the control
    plane) stay consistent. Thread-safe: daemons under test may read it from
    their own threads.
    """

    def __init__(self, start: datetime | None = None, monotonic: float = 1000.0) -> None:
        self._lock = threading.Lock()
        self._wall = start if start is not None else datetime(2026, 1, 1, 12, 0, 0)
        self._mono = monotonic

    def monotonic(self) -> float:
        with self._lock:
            return self._mono

    def now(self) -> datetime:
        with self._lock:
            return self._wall

    def time(self) -> float:
        return self.now().timestamp()

    def sleep(self, seconds: float) -> None:
        """A sleeper on a fake clock returns at once, the time having passed."""
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        """Move both clocks forward; negative steps are refused (monotonic)."""
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        with self._lock:
            self._mono += seconds
            self._wall += timedelta(seconds=seconds)


SYSTEM_CLOCK = SystemClock()
