"""Chained block hashes for prefix caching: equal prefixes give equal hashes, block by block.

A prompt is a sequence of *segments* — (content id, token count) — so traces
that name shared content (Mooncake's 512-token hash ids, RAGPulse's system
prompts and passages) share KV blocks without materialising every token.
Token-id prompts (the emulator) use ``hashes_from_tokens``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def _h(prev: int, payload: bytes) -> int:
    d = hashlib.blake2b(prev.to_bytes(8, "little") + payload, digest_size=8).digest()
    return int.from_bytes(d, "little")


def hashes_from_segments(segments: Sequence[tuple[int, int]], block_size: int) -> tuple[int, ...]:
    """Hashes of every *full* block of a prompt made of (content id, length) segments."""
    out: list[int] = []
    prev = 0
    pieces: list[bytes] = []
    filled = 0
    for seg_id, length in segments:
        offset = 0
        while offset < length:
            take = min(block_size - filled, length - offset)
            pieces.append(f"{seg_id}:{offset}:{take};".encode())
            filled += take
            offset += take
            if filled == block_size:
                prev = _h(prev, b"".join(pieces))
                out.append(prev)
                pieces, filled = [], 0
    return tuple(out)


def hashes_from_tokens(token_ids: Sequence[int], block_size: int) -> tuple[int, ...]:
    """vLLM-style: hash(parent hash, token ids of the block) for every full block."""
    full = len(token_ids) // block_size * block_size
    data = np.asarray(token_ids[:full], dtype="<u4").tobytes()
    step = 4 * block_size
    out: list[int] = []
    prev = 0
    for start in range(0, len(data), step):
        prev = _h(prev, data[start : start + step])
        out.append(prev)
    return tuple(out)
