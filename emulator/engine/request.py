"""A request inside one engine: token counters, status and timestamps. No clock, no I/O.

One counter model (vLLM v1): ``num_computed_tokens`` catches up with
``num_tokens``; a step that makes them equal samples one new token.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_REMOTE_KV = "waiting_for_remote_kv"  # decode side of P/D: blocks allocated, pull in flight
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_LENGTH = "length"
    FINISHED_REMOTE_DECODE = "remote_decode"  # prefill side of P/D: KV held until the pull completes
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    finished: bool  # set on each member below: a plain attribute, read for every sequence of every step


_FINISHED = (
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_REMOTE_DECODE,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
)
for _status in RequestStatus:
    _status.finished = _status in _FINISHED


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    arrival_s: float
    block_hashes: tuple[int, ...] = ()  # chained hashes of the prompt's full blocks (prefix caching)
    # P/D: a prefill instance produces the KV (and the first token); a decode instance consumes it.
    kv_role: str = "none"  # none | producer | consumer
    num_output_tokens: int = 0
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None
    error: str | None = None
    # accounting
    num_cached_tokens: int = 0  # prefix-cache hit at first admission
    num_preemptions: int = 0
    first_scheduled_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    kv_ready_s: float | None = None  # consumer: when the pulled KV arrived
    token_chunks: list = field(default_factory=list)  # float timestamps or np arrays of them
    # the longest gap between two output tokens so far, kept as they come so that a simulator
    # need not rebuild every token's timestamp for it when the request ends
    max_itl_s: float = 0.0
    last_token_s: float | None = None
    # async scheduling: the first scheduler call that may admit it (it came while a decided step ran)
    admit_from_call: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.num_output_tokens

    @property
    def num_new_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def add_token_time(self, t: float) -> None:
        last = self.last_token_s
        if last is not None and t - last > self.max_itl_s:
            self.max_itl_s = t - last
        self.last_token_s = t
        self.token_chunks.append(t)

    def add_token_times(self, times: np.ndarray, first: float, last: float, inner_max_gap: float) -> None:
        """A run of steps' timestamps (``first``/``last`` = ``times[0]``/``times[-1]``, ``inner_max_gap``
        = the run's own largest gap: the caller computes them once for every request that ran those
        steps)."""
        prev = self.last_token_s
        gap = first - prev if prev is not None and first - prev > inner_max_gap else inner_max_gap
        if gap > self.max_itl_s:
            self.max_itl_s = gap
        self.last_token_s = last
        self.token_chunks.append(times)

    def token_times(self) -> np.ndarray:
        """Every output token's timestamp, in order."""
        parts: list[np.ndarray] = []
        run: list[float] = []
        for c in self.token_chunks:
            if isinstance(c, float):
                run.append(c)
                continue
            if run:
                parts.append(np.asarray(run))
                run = []
            parts.append(c)
        if run:
            parts.append(np.asarray(run))
        return np.concatenate(parts) if parts else np.zeros(0)


@dataclass(eq=False, slots=True)
class ScheduledRequest:
    """One request's part of a step. A class beside the Request, not a named tuple: the compiled
    engine core builds it as a native object, the commonest allocation of a simulated step."""

    request_id: str
    num_new_tokens: int
    num_context_tokens: int  # tokens already in KV before this step
    request: Request  # the scheduler's own object (no lookup by id when the step ends)
