"""The router's least-loaded choice over a large fleet, in work proportional to what changed.

A router that snapshots every instance at every arrival costs O(instances) per request: at 1,024
instances that was 70% of a simulation's time. The board keeps each front instance's queue lengths
(running + waiting, the API server's intake included) in arrays and refreshes only the instances
whose scheduler announced a change (``Scheduler.changes``) or whose API queue moved, so a choice
costs one vectorised minimum (a plain Python pass for a few instances, where numpy's per-call cost
is the larger). It answers exactly as ``LeastLoaded.choose`` over fresh snapshots
(fewest requests, ties rotating from the policy's turn); the simulator uses it only where that
policy sees every instance (no faults: all routable, none already tried).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from emulator.engine.scheduler import Scheduler


SMALL_FLEET = 32  # up to this many instances the board keeps Python lists: cheaper than numpy's calls


class LoadBoard:
    def __init__(self, instances: Sequence) -> None:
        self.instances = list(instances)
        n = len(self.instances)
        self.small = n <= SMALL_FLEET
        self.loads = [0] * n if self.small else np.zeros(n, dtype=np.int64)
        self.waiting = [0] * n if self.small else np.zeros(n, dtype=np.int64)
        self.changed: set[Scheduler] = set()  # schedulers that announced a change since the last refresh
        self._slot = {id(inst): i for i, inst in enumerate(self.instances)}
        self._index: dict[Scheduler, int] = {}
        for i, inst in enumerate(self.instances):  # a fault-free run keeps its schedulers
            inst.scheduler.changes = self.changed
            self._index[inst.scheduler] = i
        self._stale: set[int] = set(range(len(self.instances)))

    def api_moved(self, inst) -> None:
        """The instance's API server took in or handed on a request."""
        self._stale.add(self._slot[id(inst)])

    def _refresh(self) -> None:
        stale = self._stale
        stale.update(self._index[s] for s in self.changed)
        self.changed.clear()
        for i in stale:
            running, waiting = self.instances[i].queue_lengths()  # as the router's snapshot counts them
            self.waiting[i] = waiting
            self.loads[i] = running + waiting
        stale.clear()

    def all_waiting_at_least(self, limit: int) -> bool:
        self._refresh()
        return bool((min(self.waiting) if self.small else self.waiting.min()) >= limit)

    def least_loaded(self, turn: int) -> int:
        """Index of the least-loaded instance; among equals, the first at or after ``turn`` (cyclic)."""
        self._refresh()
        loads = self.loads
        if self.small:
            least = min(loads)
            for j in range(turn % len(loads), len(loads)):
                if loads[j] == least:
                    return j
            return loads.index(least)  # none at or after the turn: the first overall
        tied = np.flatnonzero(loads == loads.min())
        j = int(np.searchsorted(tied, turn % len(self.instances)))
        return int(tied[j] if j < len(tied) else tied[0])
