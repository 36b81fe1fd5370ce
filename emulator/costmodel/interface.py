"""The cost model's contract: a frozen batch shape in, a step duration out.

The cost model never sees a live request (STYLE principle 5): the scheduler
describes each step as a ``BatchShape``, and drivers ask how long it takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class BatchShape:
    """One engine step: prefill chunks (new tokens, tokens already in KV) and decode tokens.

    ``decode_kv_sum`` is the sum over decode sequences of the KV length each one
    attends to (including the token being computed).
    """

    prefill_chunks: tuple[tuple[int, int], ...] = ()
    num_decode: int = 0
    decode_kv_sum: int = 0
    num_logits: int = field(default=-1)

    @property
    def num_tokens(self) -> int:
        # read several times per simulated step: a decode-only step skips the generator
        chunks = self.prefill_chunks
        if not chunks:
            return self.num_decode
        total = self.num_decode
        for q, _ in chunks:
            total += q
        return total

    @property
    def num_seqs(self) -> int:
        return len(self.prefill_chunks) + self.num_decode

    @property
    def logits(self) -> int:
        return self.num_seqs if self.num_logits < 0 else self.num_logits


@dataclass(frozen=True)
class StepTime:
    """``total_s``: from launch to outputs. ``interval_s``: until the instance can launch the next
    batch (shorter than total with pipeline parallelism, where micro-batches overlap)."""

    total_s: float
    interval_s: float


class CostModel(Protocol):
    def step_time(self, shape: BatchShape) -> StepTime:
        """Duration of one iteration of one instance for this batch."""
        ...

    def breakdown(self, shape: BatchShape) -> dict[str, float]:
        """Seconds per operator (whole model, all layers) for this batch; sums to compute time."""
        ...

    def decode_stretch_s(self, num_decode: int, kv_sum_start: int, steps: int) -> np.ndarray:
        """Total step times of ``steps`` consecutive pure-decode steps whose KV grows by one token
        per sequence per step; element j equals step_time of that step exactly."""
        ...
