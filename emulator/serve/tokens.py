"""Synthetic, deterministic tokens: no tokenizer download is possible offline.

Text maps to pseudo-token ids piece by piece (words, punctuation, 4-character
slices of long words), so identical prefixes give identical ids and therefore
identical KV block hashes. Output tokens and their text are a deterministic
function of the request's prompt and position, and the synthetic end-of-sequence
position follows a seeded geometric law, so the same request always produces
the same answer.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence

_PIECE = re.compile(r"\w+|[^\w\s]|\s+")
WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which have not "
    "model token cache prefill decode batch link latency throughput request stream router worker "
    "tensor pipeline expert memory bandwidth queue cluster node network compute kernel layer"
).split()
MEAN_SYNTHETIC_OUTPUT = 256  # mean length when the client does not fix it (ignore_eos / min_tokens)


def _h(text: str | bytes) -> int:
    # surrogatepass: a lone surrogate ("\ud800" in the JSON) is a (strange) token, not a crash
    data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def tokenize(text: str, vocab_size: int) -> list[int]:
    ids: list[int] = []
    for piece in _PIECE.findall(text):
        if piece.isspace():
            continue
        for start in range(0, len(piece), 4):
            ids.append(_h(piece[start : start + 4]) % vocab_size)
    return ids


def chat_prompt(messages: Sequence[dict]) -> str:
    """A chat template: role markers then content, one message after another (prefix-stable)."""
    parts = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(f"<|{m.get('role', 'user')}|> {content or ''} <|end|>")
    parts.append("<|assistant|>")
    return "\n".join(parts)


def detokenize(ids: Sequence[int]) -> str:
    """Text for token ids: one synthetic word per id (deterministic; the ids of ``tokenize`` are
    hashes, so the original text cannot come back — the length and the determinism do)."""
    return " ".join(WORDS[int(i) % len(WORDS)] for i in ids)


def output_token(seed: int, position: int, vocab_size: int) -> tuple[int, str]:
    """The position-th output token of a request: (id, text)."""
    h = _h(f"{seed}:{position}")
    word = WORDS[h % len(WORDS)]
    return h % vocab_size, (" " + word if position else word)


def prompt_seed(token_ids: Sequence[int]) -> int:
    return _h(
        b"".join(int(t).to_bytes(4, "little", signed=False) for t in token_ids[-64:]) + bytes([len(token_ids) % 251])
    )


def synthetic_eos(seed: int, min_tokens: int) -> int:
    """Where the synthetic model would stop: geometric with mean MEAN_SYNTHETIC_OUTPUT, at least min_tokens."""
    u = (_h(f"eos:{seed}") % 1_000_003 + 0.5) / 1_000_003
    import math

    length = 1 + int(math.log(u) / math.log(1 - 1 / MEAN_SYNTHETIC_OUTPUT))
    return max(length, min_tokens, 1)
