"""The back-off helper (`fiona.backoff`) on a fake clock: schedules, per-key waits, holds and
blocking retries, without sleeping."""

from __future__ import annotations

import pytest

from fiona.backoff import Backoff, Schedule, attempts
from fiona.clock import FakeClock


def test_schedule_repeats_its_last_delay_and_doubles():
    s = Schedule((5, 15, 60))
    assert [s.delay(n) for n in range(5)] == [5, 15, 60, 60, 60]
    assert Schedule.doubling(0.5, 4).delays == (0.5, 1.0, 2.0, 4.0)
    with pytest.raises(ValueError):
        Schedule(())
    with pytest.raises(ValueError):
        Schedule((1, -1))


def test_backoff_waits_longer_per_failure_and_forgets_on_success():
    clock = FakeClock()
    b = Backoff(Schedule((5, 15)), clock)
    assert b.due("a") and b.next_wait() is None
    assert b.failed("a") == 5
    assert not b.due("a") and b.remaining("a") == 5 and b.due("b")
    clock.advance(5)
    assert b.due("a") and b.failed("a") == 15 and b.failed("a") == 15
    b.hold("b", 60)                                  # a hold counts no failure
    assert b.next_wait() == 15
    b.succeeded("a")
    assert b.due("a") and b.failed("a") == 5
    clock.advance(60)
    assert b.due("b") and b.failed("b") == 5


def test_attempts_sleep_on_the_clock_between_tries_only():
    clock = FakeClock()
    start = clock.monotonic()
    tried = []
    for n in attempts(Schedule.doubling(0.5, 3), 3, clock):
        tried.append((n, clock.monotonic() - start))
    assert tried == [(0, 0.0), (1, 0.5), (2, 1.5)]
