"""Time sources. The engine never reads a clock: drivers pass ``now`` in.

The simulator advances a ``VirtualClock``; the real-time worker uses ``MonotonicClock``.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on this clock's own epoch."""
        ...


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def advance_to(self, t: float) -> None:
        if t < self._now:
            raise ValueError(f"virtual time cannot go back ({t} < {self._now})")
        self._now = t


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()
