"""Back-off: how long to wait before trying again, the one rule behind every retry in FIONA.

`Schedule` says how long the wait is after the n-th failure in a row (a fixed list of delays
whose last one repeats, or a doubling series). Two ways of using it:

- `Backoff`, for daemons that keep going while something waits (the forwarder's requests,
  the arrival detector's studies): per key, when it is due again; a success forgets the key.
- `attempts`, for a caller that blocks until its attempt works or it gives up (a DICOM
  association): the pauses between attempts, slept on the `Clock`.

Both read time from an injectable `Clock` (`fiona.clock`), so tests advance a `FakeClock`
instead of sleeping.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from dataclasses import dataclass

from .clock import SYSTEM_CLOCK, Clock


@dataclass(frozen=True)
class Schedule:
    """Delays in seconds after the 1st, 2nd, ... failure in a row; the last one repeats."""

    delays: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.delays or any(d < 0 for d in self.delays):
            raise ValueError(f"a back-off schedule needs delays >= 0, got {self.delays!r}")

    @classmethod
    def doubling(cls, first: float, steps: int) -> Schedule:
        """first, 2 × first, 4 × first, ... (`steps` delays)."""
        return cls(tuple(first * 2 ** n for n in range(max(1, steps))))

    def delay(self, failures: int) -> float:
        """The wait after `failures` + 1 failures in a row (`failures` counts earlier ones)."""
        return self.delays[min(max(failures, 0), len(self.delays) - 1)]


class Backoff:
    """When each key (a request, a study) may be tried again, on `clock`'s monotonic time."""

    def __init__(self, schedule: Schedule, clock: Clock = SYSTEM_CLOCK):
        self.schedule = schedule
        self.clock = clock
        self._failures: dict[Hashable, int] = {}
        self._due_at: dict[Hashable, float] = {}

    def failed(self, key: Hashable) -> float:
        """Count a failure of `key` and return how long it now waits."""
        n = self._failures.get(key, 0)
        self._failures[key] = n + 1
        delay = self.schedule.delay(n)
        self._due_at[key] = self.clock.monotonic() + delay
        return delay

    def hold(self, key: Hashable, seconds: float) -> None:
        """Make `key` wait `seconds` without counting a failure (e.g. a closed project)."""
        self._due_at[key] = self.clock.monotonic() + seconds

    def succeeded(self, key: Hashable) -> None:
        """Forget `key`: it is due now and its next failure waits the first delay again."""
        self._failures.pop(key, None)
        self._due_at.pop(key, None)

    def remaining(self, key: Hashable) -> float:
        """Seconds until `key` is due (0 when it is due now)."""
        return max(0.0, self._due_at.get(key, 0.0) - self.clock.monotonic())

    def due(self, key: Hashable) -> bool:
        return self.remaining(key) <= 0

    def next_wait(self) -> float | None:
        """Seconds until the next waiting key is due, None when none waits."""
        now = self.clock.monotonic()
        waits = [at - now for at in self._due_at.values() if at > now]
        return min(waits) if waits else None


def attempts(schedule: Schedule, count: int, clock: Clock = SYSTEM_CLOCK) -> Iterator[int]:
    """Attempt numbers 0 .. count-1, sleeping on `clock` by `schedule` before each retry:
    `for attempt in attempts(...): try ...; if it worked: return`."""
    for attempt in range(count):
        if attempt:
            clock.sleep(schedule.delay(attempt - 1))
        yield attempt
