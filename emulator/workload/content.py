"""Token ids for prompts described as content segments: equal content ids give equal token ids, so
prompts that quote the same content share prefix blocks in every engine, whichever process built them
(the benchmark client, the router's pipelines)."""

from __future__ import annotations

import numpy as np


def segment_token_ids(segments, vocab: int, limit: int | None = None) -> list[int]:
    ids: list[int] = []
    for seg_id, n in segments:
        seg_rng = np.random.default_rng(abs(seg_id) + (1 << 40 if seg_id < 0 else 0))
        ids.extend(seg_rng.integers(0, vocab, n).tolist())
    return ids if limit is None else ids[:limit]
