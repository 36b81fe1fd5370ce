"""Closed-loop benchmark clients as real ones behave: phases, per-request overhead, drift.

``C`` clients each send their next request when the previous one completes, after a
client-side overhead of their own (receiving the last chunk, bookkeeping, the credit
round-trip of a benchmark harness such as AIPerf's timing manager). The overhead is
random (a Gamma law with the spec's mean and coefficient of variation), so clients that
start together drift apart instead of marching in lock-step waves for the whole run.

Benchmark harnesses run a warm-up phase first: ``warmup`` requests at the same
concurrency, then they wait until every warm-up request has returned before the measured
phase starts ``C`` requests at once (AIPerf's credit phases:
``CreditIssuingStrategy._execute_phases`` waits for the phase's credits to return). Warm-up
requests are not reported; they do fill the prefix cache.

The object is pure (no clock, no I/O): the simulator and the live client both ask it when
to send what.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClientBehaviour:
    overhead_s: float = 0.0
    overhead_cv: float = 1.0
    warmup: int = 0


class ClosedLoopClients:
    """Which planned request each free client sends next, and when."""

    def __init__(self, concurrency: int, total: int, behaviour: ClientBehaviour, rng: np.random.Generator) -> None:
        self.concurrency = max(1, concurrency)
        self.total = total
        self.b = behaviour
        self.rng = rng
        self.warmup = min(behaviour.warmup, total)
        self._next = 0
        self._warmup_done = 0
        self._measuring = self.warmup == 0

    def is_warmup(self, index: int) -> bool:
        return index < self.warmup

    def _gap(self) -> float:
        b = self.b
        if b.overhead_s <= 0:
            return 0.0
        if b.overhead_cv <= 0:
            return b.overhead_s
        shape = 1.0 / b.overhead_cv**2
        return float(self.rng.gamma(shape, b.overhead_s / shape))

    def _take(self, t: float, limit: int) -> tuple[float, int] | None:
        if self._next >= limit:
            return None
        index = self._next
        self._next += 1
        return t, index

    def start(self, t: float = 0.0) -> list[tuple[float, int]]:
        """The first sends: ``C`` requests of the first phase at once."""
        limit = self.warmup if not self._measuring else self.total
        sends = [self._take(t, limit) for _ in range(self.concurrency)]
        return [s for s in sends if s is not None]

    def on_done(self, index: int, t: float) -> list[tuple[float, int]]:
        """A client saw request ``index`` end (completed or failed) at ``t``: what is sent next."""
        if not self._measuring:
            self._warmup_done += 1
            nxt = self._take(t + self._gap(), self.warmup)
            if nxt is not None:
                return [nxt]
            if self._warmup_done < self.warmup:
                return []
            self._measuring = True  # every warm-up request is back: the measured phase starts at once
            return self.start(t)
        nxt = self._take(t + self._gap(), self.total)
        return [] if nxt is None else [nxt]
