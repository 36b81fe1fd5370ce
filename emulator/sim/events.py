"""A heap of events ordered by (time, insertion order): deterministic ties, no I/O.

Some events *observe* instance state (arrivals and KV hand-offs consult the
router's snapshots; KV arrivals change a decode queue). The queue keeps their
times in a second heap so the simulator can advance steady decode stretches in
bulk right up to the next such event.
"""

from __future__ import annotations

import heapq
from typing import Any


class EventQueue:
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, str, Any, bool]] = []
        self._observing: list[float] = []
        self._seq = 0
        self.processed = 0

    def push(self, time_s: float, kind: str, payload: Any = None, observing: bool = False) -> None:
        heapq.heappush(self._heap, (time_s, self._seq, kind, payload, observing))
        if observing:
            heapq.heappush(self._observing, time_s)
        self._seq += 1

    def pop(self) -> tuple[float, str, Any]:
        t, _, kind, payload, observing = heapq.heappop(self._heap)
        if observing:
            heapq.heappop(self._observing)  # its own entry: the earliest pending observing time
        self.processed += 1
        return t, kind, payload

    def next_observing(self) -> float:
        return self._observing[0] if self._observing else float("inf")

    def __len__(self) -> int:
        return len(self._heap)
