"""Routing policies as functions of plain snapshots, shared by the simulator and the live router.

A policy sees ``EndpointSnapshot``s (what a router can scrape from ``/metrics``)
and a ``RoutingRequest`` (what it can read from the HTTP request) and returns
the index of the chosen endpoint. No sockets, no framework objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class EndpointSnapshot:
    name: str
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    free_blocks: int = 0
    healthy: bool = True

    @property
    def load(self) -> int:
        return self.num_running + self.num_waiting


@dataclass(frozen=True)
class RoutingRequest:
    request_id: str
    block_hashes: tuple[int, ...] = ()
    session: str | None = None
    prompt_tokens: int = 0


class RoutingPolicy(Protocol):
    def choose(self, endpoints: Sequence[EndpointSnapshot], request: RoutingRequest) -> int:
        """Index into ``endpoints`` of the backend for this request."""
        ...


class NoEndpointError(RuntimeError):
    pass


def _healthy(endpoints: Sequence[EndpointSnapshot]) -> list[int]:
    idx = [i for i, e in enumerate(endpoints) if e.healthy]
    if not idx:
        raise NoEndpointError("no healthy backend")
    return idx


class RoundRobin:
    def __init__(self) -> None:
        self._next = 0

    def choose(self, endpoints: Sequence[EndpointSnapshot], request: RoutingRequest) -> int:
        healthy = _healthy(endpoints)
        i = healthy[self._next % len(healthy)]
        self._next += 1
        return i


class LeastLoaded:
    """Fewest running + waiting requests; ties rotate (round robin among the least loaded).

    Rotation, not KV usage, breaks ties: KV usage is the stalest number a router scrapes,
    and at light load nearly every decision is a tie."""

    def __init__(self) -> None:
        self._turn = 0

    def next_turn(self) -> int:
        """Where this decision's tie rotation starts (a fleet-scale chooser shares it: sim/loadboard)."""
        self._turn += 1
        return self._turn - 1

    def choose(self, endpoints: Sequence[EndpointSnapshot], request: RoutingRequest) -> int:
        n = len(endpoints)
        turn = self.next_turn()
        return min(_healthy(endpoints), key=lambda i: (endpoints[i].load, (i - turn) % n))


class KVAware:
    """For P/D decode: fewest requests, then the most free KV blocks (the pulled KV must fit)."""

    def choose(self, endpoints: Sequence[EndpointSnapshot], request: RoutingRequest) -> int:
        return min(_healthy(endpoints), key=lambda i: (endpoints[i].load, -endpoints[i].free_blocks, i))


def _score(key: str, name: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{key}|{name}".encode(), digest_size=8).digest(), "little")


class _Affinity:
    """Rendezvous hashing on a key, bounded by load: when the preferred backend carries more
    than ``load_factor`` × the mean load (+1), the next-ranked backend takes the request."""

    load_factor = 1.25

    def key(self, request: RoutingRequest) -> str | None:
        raise NotImplementedError

    def choose(self, endpoints: Sequence[EndpointSnapshot], request: RoutingRequest) -> int:
        healthy = _healthy(endpoints)
        key = self.key(request)
        if key is None:
            return LeastLoaded().choose(endpoints, request)
        ranked = sorted(healthy, key=lambda i: _score(key, endpoints[i].name), reverse=True)
        mean = sum(endpoints[i].load for i in healthy) / len(healthy)
        bound = self.load_factor * mean + 1
        for i in ranked:
            if endpoints[i].load <= bound:
                return i
        return ranked[0]


class PrefixAffinity(_Affinity):
    """Consistent hashing of the leading prompt blocks, so shared prefixes meet their cache."""

    leading_blocks = 4

    def key(self, request: RoutingRequest) -> str | None:
        if not request.block_hashes:
            return None
        return ",".join(str(h) for h in request.block_hashes[: self.leading_blocks])


class SessionAffinity(_Affinity):
    """Sticky sessions by a header or the OpenAI ``user`` field."""

    def key(self, request: RoutingRequest) -> str | None:
        return request.session


def make_policy(name: str) -> RoutingPolicy:
    """The policy for prefill/aggregated choice; ``pd`` picks prefill by load (decode uses KVAware)."""
    table = {
        "round_robin": RoundRobin,
        "least_loaded": LeastLoaded,
        "prefix_affinity": PrefixAffinity,
        "session": SessionAffinity,
        "pd": LeastLoaded,
    }
    if name not in table:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(table)}")
    return table[name]()
