"""Flow-level network: concurrent transfers share link capacity max-min fairly.

Each flow crosses a set of resources (the sender's egress and the receiver's
ingress on the tier between them). Rates come from progressive filling: raise
all unfrozen flows' rates equally until a resource saturates, freeze the flows
on it, repeat. Rates are recomputed whenever a flow starts or ends.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Flow:
    flow_id: str
    remaining_bytes: float
    resources: tuple[str, ...]
    rate: float = 0.0


class FlowNetwork:
    def __init__(self) -> None:
        self.capacity: dict[str, float] = {}
        self.flows: dict[str, Flow] = {}
        self._last = 0.0

    def set_capacity(self, resource: str, bytes_per_s: float) -> None:
        self.capacity[resource] = bytes_per_s

    def _progress(self, now: float) -> None:
        dt = now - self._last
        if dt > 0:
            for f in self.flows.values():
                f.remaining_bytes = max(0.0, f.remaining_bytes - f.rate * dt)
        self._last = max(self._last, now)

    def add(self, flow_id: str, nbytes: float, resources: tuple[str, ...], now: float) -> None:
        self._progress(now)
        for r in resources:
            if r not in self.capacity:
                raise KeyError(f"resource {r!r} has no capacity")
        self.flows[flow_id] = Flow(flow_id, float(nbytes), resources)
        self._allocate()

    def remove(self, flow_id: str, now: float) -> None:
        self._progress(now)
        self.flows.pop(flow_id, None)
        self._allocate()

    def _allocate(self) -> None:
        unfrozen = set(self.flows)
        residual = dict(self.capacity)
        for f in self.flows.values():
            f.rate = 0.0
        while unfrozen:
            share = {}
            for r, cap in residual.items():
                users = [fid for fid in unfrozen if r in self.flows[fid].resources]
                if users:
                    share[r] = cap / len(users)
            if not share:
                break
            bottleneck = min(share, key=share.get)
            inc = share[bottleneck]
            for fid in unfrozen:
                self.flows[fid].rate += inc
                for r in self.flows[fid].resources:
                    residual[r] -= inc
            frozen = {fid for fid in unfrozen if bottleneck in self.flows[fid].resources}
            # resources saturated to within rounding freeze their flows too
            for r, left in residual.items():
                if left <= 1e-9 * max(self.capacity[r], 1.0):
                    frozen |= {fid for fid in unfrozen if r in self.flows[fid].resources}
            unfrozen -= frozen

    def completion_times(self, now: float) -> dict[str, float]:
        self._progress(now)
        return {
            fid: now + (f.remaining_bytes / f.rate if f.rate > 0 else float("inf")) for fid, f in self.flows.items()
        }
