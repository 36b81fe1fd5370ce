"""What keeps a router useful while its fleet fails: a retry budget, admission control, and the
spec's router section turned into wall-clock settings.

A retry budget (Linkerd, Envoy's ``retry_budget``) bounds retries to a share of recent
requests plus a small floor, so a fleet that is failing is not hit by a retry storm
that keeps it down. Admission control answers at once (429/503 with ``Retry-After``)
when every backend's queue is past its limit, instead of queueing without bound.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from emulator.router.backends import Backend, HealthPolicy
from emulator.spec import RouterSpec

WINDOW_S = 10.0


class RetryBudget:
    def __init__(self, percent: float, min_per_second: float, window_s: float = WINDOW_S) -> None:
        self.percent = percent
        self.min_per_second = min_per_second
        self.window_s = window_s
        self._requests: collections.deque[float] = collections.deque()
        self._retries: collections.deque[float] = collections.deque()

    def _prune(self, now: float) -> None:
        for q in (self._requests, self._retries):
            while q and q[0] < now - self.window_s:
                q.popleft()

    def record_request(self, now: float) -> None:
        self._requests.append(now)

    def try_retry(self, now: float) -> bool:
        """Spend one retry if the budget allows it."""
        self._prune(now)
        allowed = self.min_per_second * self.window_s + self.percent / 100.0 * len(self._requests)
        if len(self._retries) >= allowed:
            return False
        self._retries.append(now)
        return True


def overloaded(candidates: list[Backend], max_waiting: int) -> bool:
    """Every healthy candidate's queue is at its limit: a new request would only wait longer."""
    return bool(candidates) and all(b.queued >= max_waiting for b in candidates)


@dataclass(frozen=True)
class Resilience:
    """The spec's ``router`` section in wall seconds: every emulated duration times the dilation D."""

    health: HealthPolicy
    connect_s: float
    first_byte_s: float
    idle_s: float
    request_s: float
    client_write_s: float
    max_attempts: int
    retry_percent: float
    retry_min_per_s: float
    max_waiting: int
    max_in_flight: int
    reject_status: int
    retry_after_s: int
    pd_fallback: str

    @classmethod
    def from_spec(cls, r: RouterSpec, dilation: float = 1.0) -> Resilience:
        s = 1e-3 * dilation
        hc, cb, t, a = r.health_check, r.circuit_breaker, r.timeouts, r.admission
        return cls(
            health=HealthPolicy(
                interval_s=hc.interval_ms * s,
                timeout_s=hc.timeout_ms * s,
                unhealthy_threshold=hc.unhealthy_threshold,
                healthy_threshold=hc.healthy_threshold,
                consecutive_failures=cb.consecutive_failures,
                ejection_s=cb.ejection_ms * s,
                max_ejection_s=cb.max_ejection_ms * s,
            ),
            connect_s=t.connect_ms * s,
            first_byte_s=t.first_byte_ms * s,
            idle_s=t.idle_ms * s,
            request_s=t.request_ms * s,
            client_write_s=t.client_write_ms * s,
            max_attempts=r.retry.max_attempts,
            retry_percent=r.retry.budget_percent,
            retry_min_per_s=r.retry.min_per_second / dilation,
            max_waiting=a.max_waiting_per_backend,
            max_in_flight=a.max_in_flight,
            reject_status=a.reject_status,
            retry_after_s=a.retry_after_s,
            pd_fallback=r.pd_fallback,
        )
