"""Fetch or recompute: pull a prefix's KV from the store only when that is faster than computing it.

LMCache and Mooncake always load a hit; a long link or a short prefix can make the load slower
than the prefill it saves (CacheBlend, CacheGen and Mooncake's paper discuss the trade-off), so the
engine compares the two with the same models the rest of infemu uses: the transfer over the store's
tier (latency + bytes / rate) and the prefill cost model's time for those tokens in this step.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.catalog.links import LinkTier
from emulator.costmodel.interface import BatchShape


@dataclass(frozen=True)
class FetchPlan:
    blocks: int  # leading store blocks to fetch (0: recompute everything)
    fetch_s: float
    recompute_s: float  # the prefill time those tokens would have cost

    @property
    def fetch(self) -> bool:
        return self.blocks > 0


def transfer_s(nbytes: float, rate: float, latency_s: float) -> float:
    return latency_s + nbytes / rate


def plan_fetch(
    cost,
    *,
    local_tokens: int,
    store_blocks: int,
    prompt_tokens: int,
    block_size: int,
    block_bytes: float,
    rate: float,
    latency_s: float,
) -> FetchPlan:
    """``cost``: the instance's step cost model; ``local_tokens``: the prefix already in the engine's own
    cache; ``store_blocks``: the store's contiguous blocks after it. The last prompt token is always
    computed (as a prefix-cache hit leaves it), so at most prompt - 1 tokens come from the store."""
    usable = min(store_blocks, max((prompt_tokens - 1) // block_size - local_tokens // block_size, 0))
    if usable <= 0:
        return FetchPlan(0, 0.0, 0.0)
    saved = usable * block_size
    with_all = _prefill_s(cost, prompt_tokens - local_tokens, local_tokens)
    with_fetch = _prefill_s(cost, prompt_tokens - local_tokens - saved, local_tokens + saved)
    recompute = max(with_all - with_fetch, 0.0)
    fetch = transfer_s(usable * block_bytes, rate, latency_s)
    return FetchPlan(usable if fetch < recompute else 0, fetch, recompute)


def _prefill_s(cost, new_tokens: int, context: int) -> float:
    """One prefill step of ``new_tokens`` after ``context`` cached tokens."""
    return cost.step_time(BatchShape(prefill_chunks=((new_tokens, context),))).total_s


def plan_prompt_fetch(
    cost, *, local_blocks: int, store_blocks: int, prompt_tokens: int, block_size: int, block_bytes: float,
    tier: LinkTier, endpoints: int,
) -> FetchPlan:  # fmt: skip
    """``plan_fetch`` for a prompt whose first ``local_blocks`` the engine holds, over the store's tier with
    ``endpoints`` NICs on the narrower side (the store node's, one per GPU slot, or the engine's GPUs)."""
    return plan_fetch(
        cost,
        local_tokens=local_blocks * block_size,
        store_blocks=store_blocks,
        prompt_tokens=prompt_tokens,
        block_size=block_size,
        block_bytes=block_bytes,
        rate=tier.bandwidth * endpoints,
        latency_s=tier.latency_s,
    )
