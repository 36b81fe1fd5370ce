"""Plain data crossing the engine boundary: what a step runs, what it produced, engine stats."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from emulator.costmodel.interface import BatchShape
from emulator.engine.request import ScheduledRequest

# A step's per-request records: a simulated fleet builds millions of them. ScheduledRequest lives with
# the Request (emulator/engine/request.py), where the compiled core builds it natively.


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledRequest, ...]
    shape: BatchShape
    kv_pulls: tuple[str, ...] = ()  # consumer requests whose blocks were just allocated: start pulling
    preempted: tuple[str, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class RequestOutput(NamedTuple):
    """What one step did for one request: tokens sampled and whether it ended."""

    request_id: str
    new_tokens: int
    finished: bool
    finish_reason: str | None = None


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for routers and metrics adapters (vLLM's stats dataclasses, STYLE principle 9)."""

    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    num_gpu_blocks: int
    prefix_queries: int
    prefix_hits: int
    num_preemptions: int
    num_iterations: int
    prompt_tokens: int
    generation_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens found in the prefix cache when a request was first scheduled
    remote_prompt_tokens: int = 0  # prompt tokens whose KV arrived from a P/D prefill instance
    num_waiting_deferred: int = 0  # waiting on something other than capacity (a KV pull in flight)
