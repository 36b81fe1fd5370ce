"""Builders for step-driven engine tests (vLLM tests/v1/core/utils.py style)."""

from __future__ import annotations

from emulator.engine.config import EngineConfig
from emulator.engine.hashing import hashes_from_segments
from emulator.engine.request import Request
from emulator.engine.scheduler import Scheduler


def create_scheduler(
    num_blocks: int = 1000,
    block_size: int = 16,
    max_num_seqs: int = 64,
    max_num_batched_tokens: int = 2048,
    chunked: bool = True,
    caching: bool = True,
    max_model_len: int = 1 << 20,
) -> Scheduler:
    return Scheduler(
        EngineConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=block_size,
            num_gpu_blocks=num_blocks,
            max_model_len=max_model_len,
            enable_prefix_caching=caching,
            enable_chunked_prefill=chunked,
        )
    )


def create_request(
    rid: str,
    prompt: int,
    output: int,
    arrival: float = 0.0,
    prefix_id: int | None = None,
    prefix_len: int = 0,
    block_size: int = 16,
    kv_role: str = "none",
) -> Request:
    segments = []
    if prefix_id is not None and prefix_len:
        segments.append((prefix_id, min(prefix_len, prompt)))
    if prompt > prefix_len:
        segments.append((hash(rid) & 0xFFFFFFF, prompt - prefix_len))
    return Request(rid, prompt, output, arrival, hashes_from_segments(segments, block_size), kv_role=kv_role)


def run_to_completion(sched: Scheduler, step_s: float = 0.01, max_steps: int = 100_000, check: bool = True):
    """Step until idle; returns (finished request ids in order, steps)."""
    now = 0.0
    finished: list[str] = []
    steps = 0
    while sched.has_work() and steps < max_steps:
        out = sched.schedule(now)
        assert out.shape.num_tokens <= sched.config.max_num_batched_tokens
        if out.is_empty:
            raise AssertionError("scheduler has work but scheduled nothing")
        now += step_s
        for ro in sched.update_from_output(out, now):
            if ro.finished:
                finished.append(ro.request_id)
        if check:
            sched.check_invariants()
        steps += 1
    return finished, steps
