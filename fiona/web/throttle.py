"""Login throttling against password guessing: per user name and per client address.

A key (a user name or an address) may fail `free` times; each failure after that locks the key
for a delay that doubles (2 s, 4 s, 8 s, ...) up to `max_delay` (15 minutes: a temporary
lockout). While a key is locked, attempts are refused without checking the password, so a
guesser gets a handful of tries per quarter hour instead of thousands. A successful login
clears its user name; a key is forgotten `forget` seconds after its last failure.

State is kept in memory (one `fiona web` process), bounded to `max_keys` entries so a flood of
made-up names cannot exhaust memory; time comes from an injectable `Clock`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..clock import SYSTEM_CLOCK, Clock


@dataclass
class _Entry:
    failures: int = 0
    last: float = 0.0
    locked_until: float = 0.0


class Throttle:
    def __init__(self, free: int, clock: Clock = SYSTEM_CLOCK, max_delay: float = 900.0,
                 forget: float = 3600.0, max_keys: int = 10000):
        self.free = free
        self.clock = clock
        self.max_delay = max_delay
        self.forget = forget
        self.max_keys = max_keys
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def _live(self, key: str, now: float) -> _Entry | None:
        entry = self._entries.get(key)
        if entry and now - entry.last > self.forget and now >= entry.locked_until:
            del self._entries[key]
            return None
        return entry

    def wait(self, key: str) -> float:
        """Seconds until `key` may try again (0: now)."""
        with self._lock:
            now = self.clock.monotonic()
            entry = self._live(key, now)
            return max(0.0, entry.locked_until - now) if entry else 0.0

    def failed(self, key: str) -> float:
        """Record a failure; returns the lock it starts in seconds (0: none yet)."""
        with self._lock:
            now = self.clock.monotonic()
            entry = self._live(key, now)
            if entry is None:
                if len(self._entries) >= self.max_keys:
                    oldest = min(self._entries, key=lambda k: self._entries[k].last)
                    del self._entries[oldest]
                entry = self._entries[key] = _Entry()
            entry.failures += 1
            entry.last = now
            over = entry.failures - self.free
            delay = min(2.0 ** over, self.max_delay) if over > 0 else 0.0
            entry.locked_until = now + delay
            return delay

    def succeeded(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


class LoginThrottle:
    """The two throttles a login passes: its user name (5 free failures) and its client address
    (20, as several people may share one address behind a proxy or NAT)."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK):
        self.users = Throttle(5, clock)
        self.addresses = Throttle(20, clock)

    @staticmethod
    def _user_key(name: str) -> str:
        return name[:128].lower()

    def wait(self, name: str, address: str) -> float:
        return max(self.users.wait(self._user_key(name)), self.addresses.wait(address))

    def failed(self, name: str, address: str) -> float:
        return max(self.users.failed(self._user_key(name)), self.addresses.failed(address))

    def succeeded(self, name: str) -> None:
        self.users.succeeded(self._user_key(name))
