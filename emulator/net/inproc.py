"""The ``inproc`` shaping backend: pacing in the sender, no privileges needed.

A ``PacedLink`` is one logical link (this instance's egress on one tier). Every
flow on it reserves its chunks on a shared timeline at the link's rate, so
concurrent flows interleave and share the bandwidth; propagation latency is
added once per message by the sender (there is no netem on this kernel).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

CHUNK_BYTES = 64 * 1024


class PacedLink:
    def __init__(self, name: str, rate_bytes_per_s: float, latency_s: float) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError("a link needs a positive rate")
        self.name = name
        self.rate = rate_bytes_per_s
        self.latency_s = latency_s
        self._next_free = 0.0

    def set(self, rate_bytes_per_s: float | None = None, latency_s: float | None = None) -> None:
        """Live change (faults, degradations); applies to chunks not yet reserved."""
        if rate_bytes_per_s is not None:
            self.rate = rate_bytes_per_s
        if latency_s is not None:
            self.latency_s = latency_s

    async def send(self, nbytes: int, write: Callable[[bytes], Awaitable[None]]) -> float:
        """Send nbytes through write(), paced; returns the seconds it took."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        left = nbytes
        payload = bytes(CHUNK_BYTES)
        # The flow's own timeline: a late wake-up must not push every later chunk back
        # (asyncio rounds sleeps up to the millisecond), so each chunk starts when the
        # previous one was due, or when the link frees up, never at "now".
        flow_due = loop.time()
        while left > 0:
            size = min(CHUNK_BYTES, left)
            start = max(flow_due, self._next_free)
            done = start + size / self.rate
            self._next_free = done
            flow_due = done
            delay = done - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await write(payload[:size])
            left -= size
        return loop.time() - t0


def byte_scale(logical_rate: float, target_rate: float = 40e6) -> float:
    """Bytes-on-the-wire divisor S for a tier: scaled rate = logical / S <= target (default 40 MB/s).

    A 2-core host paces tens of MB/s per link accurately in Python; the duration of a
    transfer is unchanged because both bytes and rate are divided by S.
    """
    return max(1.0, logical_rate / target_rate)
