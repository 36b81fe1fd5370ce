"""An asyncio event loop whose timers fire on time, for every process that keeps emulated time.

asyncio sleeps in ``epoll_wait``, which takes whole milliseconds, and its selector rounds the
wait up (``selectors.EpollSelector.select``: ``math.ceil(timeout * 1e3) * 1e-3``), so a timer
fires up to a millisecond late: 0.8 ms median and 0.9 ms p99 for 2.3 ms timers on this 2-core
host (2026-11-27). An engine step is 5-30 ms and must end within 5% of its modelled time
(``trust.TIMING_BUDGET``), so the rounding alone flagged a single idle-host instance as
overloaded (step timing error p99 0.59 ms). Here the loop waits on the epoll descriptor itself
with ``select()``, whose timeout has microsecond resolution, then collects the ready events
without blocking: 0.10 ms median and 0.21 ms p99 on the same host, at the cost of one extra
system call per wait that a descriptor ends (a wait that times out has nothing to collect).
uvloop is no alternative: libuv's timers count whole milliseconds, and on this host they fired
0.3 ms early to 0.7 ms late for 2.3 ms timers (uvloop 0.23, 2026-11-27), where a step's tokens
must never be released before their time. Where epoll does not exist (kqueue takes nanosecond timeouts) or the loop
cannot be chosen (Python 3.10 has no ``asyncio.Runner``), this is asyncio's default loop.
"""

from __future__ import annotations

import asyncio
import select
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
_SELECT_FD_LIMIT = 1024  # FD_SETSIZE: select() cannot watch a descriptor at or above it


if hasattr(selectors, "EpollSelector"):

    class PreciseEpollSelector(selectors.EpollSelector):
        """epoll for the events, select() on the epoll descriptor for a sub-millisecond wait."""

        def select(self, timeout: float | None = None):
            fd = self._selector.fileno()
            if timeout is not None and timeout > 0 and fd < _SELECT_FD_LIMIT:
                if not select.select([fd], [], [], timeout)[0]:  # readable once any registered descriptor is
                    return []  # a timer's wait that nothing interrupted: no events to collect
                timeout = 0
            return super().select(timeout)

    def new_event_loop() -> asyncio.AbstractEventLoop:
        return asyncio.SelectorEventLoop(PreciseEpollSelector())

else:  # pragma: no cover - not Linux

    def new_event_loop() -> asyncio.AbstractEventLoop:
        return asyncio.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on the precise loop."""
    runner_class = getattr(asyncio, "Runner", None)
    if runner_class is None:  # pragma: no cover - Python 3.10
        return asyncio.run(main)
    with runner_class(loop_factory=new_event_loop) as runner:
        return runner.run(main)
