"""Synthetic, deterministic tokens: no tokenizer download is possible offline.

Text is cut into pre-tokens exactly as OpenAI's cl100k_base tokenizer cuts it (its regular
expression, in Python's ``re``: letters with one leading space or symbol, numbers in groups of
up to three digits, symbol runs, newlines, space runs), and each pre-token becomes as many
pseudo-token ids as a real BPE would give it *on average*: one per number group, space run or
newline, one or more per symbol run by its length, and for a word the expected number of BPE
pieces at its length (``WORD_PIECES``, fitted on cl100k_base counts; see there). A word's
fractional expectation is settled by a hash of the word, so the count is unbiased over a text
and the same word always gives the same ids: identical prefixes give identical ids and
therefore identical KV block hashes. Output tokens and their text are a deterministic function
of the request's prompt and position, and the synthetic end-of-sequence position follows a
seeded geometric law, so the same request always produces the same answer.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

# cl100k_base's pre-tokenizer (tiktoken_ext/openai_public.py) with \p{L} = [^\W\d_] and
# \p{N} = \d; on infemu's docs, README and three licence texts it cuts exactly as tiktoken does
_PRE = re.compile(
    r"""'(?i:[sdmt]|ll|ve|re)|(?:[^\r\n\w]|_)?[^\W\d_]+|\d{1,3}| ?(?:[^\s\w]|_)+[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s"""
)
_LETTERS = re.compile(r"[^\W\d_]+")
# Mean cl100k_base tokens of a pre-token holding a word of 1..15 letters (index 0: one letter).
# Fitted by tools/fit_tokenizer.py on infemu's docs/*.md and README.md (2026-11-26) and Debian's
# GPL-2, GPL-3 and GFDL-1.3 texts (/usr/share/common-licenses), 183k characters, against
# cl100k_base (tiktoken; file sha256 223921b7...65b2a7). Held out (tests/data/
# tokenizer_reference.json): Apache-2.0 +9.6%, LGPL-2.1 +6.5%, Artistic +10.4%, MPL-2.0 +14.5%;
# the previous rule (4-character slices of every word) counted +28% to +49% on the same texts.
WORD_PIECES = (1.005, 1.015, 1.074, 1.082, 1.084, 1.211, 1.167, 1.263, 1.309, 1.416, 1.512, 1.497, 1.954, 2.5, 2.185)
LONG_WORD_CHARS_PER_PIECE = 16 / 2.982  # words of 16+ letters: 2.98 pieces at 16 letters, proportional beyond
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


def word_pieces(word: str) -> int:
    """BPE pieces of a word: the mean at its length, the fraction settled by the word's hash."""
    n = len(word)
    mean = WORD_PIECES[n - 1] if n <= len(WORD_PIECES) else n / LONG_WORD_CHARS_PER_PIECE
    u = (_h(word) % 1_000_003 + 0.5) / 1_000_003
    return max(1, int(mean + u))


def _symbol_pieces(run: str) -> int:
    # cl100k merges common pairs ("**", "),", "->"); longer runs split about every two characters
    n = len(run.strip())
    return 1 if n <= 2 else round(n / 2)


def tokenize(text: str, vocab_size: int) -> list[int]:
    ids: list[int] = []
    for piece in _PRE.findall(text):
        word = _LETTERS.search(piece)
        if word is None:
            count = 1 if piece.isspace() or piece.strip().isdigit() else _symbol_pieces(piece)
        else:
            count = word_pieces(word.group())
        ids.append(_h(piece) % vocab_size)
        for i in range(1, count):
            ids.append(_h(f"{piece}\x00{i}") % vocab_size)
    return ids


def chat_prompt(messages: Sequence[dict], tools: Sequence[dict] | None = None) -> str:
    """A chat template: the tool definitions first, then role markers and content, one message after
    another (prefix-stable). Real templates render the tools' JSON schemas into the prompt (Qwen's,
    DeepSeek's and Hermes-style ones in the system turn, where requests with the same tools share a
    prefix), and an assistant turn's tool calls as their name and arguments; both are prompt tokens
    the engine prefills and caches, often thousands in agentic traffic."""
    parts = []
    if tools:
        parts.append("<|system|> # Tools\n" + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools) + " <|end|>")
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts (a text part's text is a string)
            content = " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        elif not isinstance(content, str):
            content = ""  # (None: an assistant turn with tool calls only; anything else the request's check refuses)
        calls = m.get("tool_calls")
        if isinstance(calls, list) and calls:
            content = f"{content or ''} " + " ".join(_tool_call(c) for c in calls)
        parts.append(f"<|{m.get('role', 'user')}|> {content or ''} <|end|>")
    parts.append("<|assistant|>")
    return "\n".join(parts)


def _tool_call(call: object) -> str:
    """A call as templates render it; its arguments are a JSON string (the API's own type), anything
    else renders as nothing (the request's check refuses it; routing reads whatever comes)."""
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else {}
    name, arguments = fn.get("name"), fn.get("arguments")
    return json.dumps(
        {"name": name if isinstance(name, str) else "", "arguments": arguments if isinstance(arguments, str) else ""},
        ensure_ascii=False,
    )


def detokenize(ids: Sequence[int]) -> str:
    """Text for token ids: one synthetic word per id (deterministic; the ids of ``tokenize`` are
    hashes, so the original text cannot come back — the length and the determinism do)."""
    return " ".join(WORDS[int(i) % len(WORDS)] for i in ids)


_MASK64 = (1 << 64) - 1
# each word's text as a streamed token carries it, JSON-encoded: first in the answer, and after a space
_FIRST_JSON = tuple(json.dumps(w).encode() for w in WORDS)
_LATER_JSON = tuple(json.dumps(" " + w).encode() for w in WORDS)


def _token_hash(seed: int, position: int) -> int:
    """A request's position-th output token as a 64-bit hash: splitmix64's finaliser (Steele, Lea and
    Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014) over seed + golden-ratio steps.
    Every streamed token pays for it, so it is integer arithmetic, not a digest of a formatted string."""
    x = (seed + (position + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def output_token(seed: int, position: int, vocab_size: int) -> tuple[int, str]:
    """The position-th output token of a request: (id, text)."""
    h = _token_hash(seed, position)
    word = WORDS[h % len(WORDS)]
    return h % vocab_size, (" " + word if position else word)


def output_token_json(seed: int, position: int) -> bytes:
    """The position-th output token's text as a JSON string (``output_token``'s, pre-encoded): the
    streaming hot path's form."""
    return (_LATER_JSON if position else _FIRST_JSON)[_token_hash(seed, position) % len(WORDS)]


@dataclass(frozen=True)
class StopHit:
    """Where a request's stop string or stop token ends its answer: ``n_out`` tokens are generated
    (the one that completed the match counts, as in vLLM's usage), ``texts`` is each one's text with
    the answer cut where the stop string begins (vLLM's ``include_stop_str_in_output`` false; a stop
    token's own text is left out), and ``reason`` is vLLM's ``stop_reason``: the string or the id."""

    n_out: int
    texts: list[str]
    reason: str | int


def stop_hit(
    seed: int, n_out: int, vocab_size: int, stop: Sequence[str], stop_token_ids: Sequence[int], min_tokens: int = 0
) -> StopHit | None:
    """The first of the answer's ``n_out`` tokens at which a stop string appears in the text so far or
    a stop token is generated, checked token by token as vLLM's detokenizer checks (each stop string
    looked for where the new text could complete it, in the order the client listed them; nothing
    checked until more than ``min_tokens`` are out); None when the answer runs its course. Costs what
    generating the answer's text costs, bounded by ``n_out``."""
    ids = set(stop_token_ids)
    texts: list[str] = []
    text = ""
    for position in range(n_out):
        token_id, piece = output_token(seed, position, vocab_size)
        checked = position >= min_tokens
        if checked and token_id in ids:
            return StopHit(position + 1, [*texts, ""], token_id)
        texts.append(piece)
        start = len(text)
        text += piece
        for s in stop if checked else ():
            cut = text.find(s, max(0, start - len(s) + 1))  # a match the new piece completes
            if cut >= 0:
                return StopHit(position + 1, _cut(texts, cut), s)
    return None


def _cut(texts: list[str], keep: int) -> list[str]:
    """Each token's text with the whole cut to its first ``keep`` characters."""
    out, at = [], 0
    for piece in texts:
        out.append(piece[: max(0, keep - at)])
        at += len(piece)
    return out


def prompt_seed(token_ids: Sequence[int]) -> int:
    return _h(
        b"".join(int(t).to_bytes(4, "little", signed=False) for t in token_ids[-64:]) + bytes([len(token_ids) % 251])
    )


def synthetic_eos(seed: int, min_tokens: int) -> int:
    """Where the synthetic model would stop: geometric with mean MEAN_SYNTHETIC_OUTPUT, at least min_tokens."""
    u = (_h(f"eos:{seed}") % 1_000_003 + 0.5) / 1_000_003
    length = 1 + int(math.log(u) / math.log(1 - 1 / MEAN_SYNTHETIC_OUTPUT))
    return max(length, min_tokens, 1)
