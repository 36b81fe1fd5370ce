"""Trace readers: Azure LLM (CSV), Mooncake (JSONL), BurstGPT (CSV), RAGPulse (JSONL).

Every reader yields ``TraceRecord``s with seconds from the trace start and the
prompt described as content segments, so shared prefixes (Mooncake hash ids,
RAGPulse system prompts and passages) become shared KV blocks. A malformed file
raises ``InputError`` naming the file, the line and the problem.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from datetime import datetime

from emulator.errors import InputError

MOONCAKE_BLOCK_TOKENS = 512  # Mooncake FAST'25 traces: one hash id per 512-token block


@dataclass(frozen=True)
class TraceRecord:
    timestamp_s: float
    input_len: int
    output_len: int
    segments: tuple[tuple[int, int], ...] = ()  # (content id, tokens); empty = unique prompt
    session_id: str | None = None


def _require(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(f"{path}: trace file not found")
    if not os.path.isfile(path):
        raise InputError(f"{path}: not a regular file; spec.workload.arrival.path must name a trace file")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: trace file is empty")


def _parse_time(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        pass
    text = value.strip()
    if "." in text:  # Azure writes 7 fractional digits; datetime takes at most 6
        head, frac = text.split(".", 1)
        text = f"{head}.{frac[:6]}"
    return datetime.fromisoformat(text).timestamp()


def _csv_records(path: str, ts_col: str, in_col: str, out_col: str) -> list[TraceRecord]:
    _require(path)
    records = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in (ts_col, in_col, out_col) if c not in (reader.fieldnames or [])]
        if missing:
            raise InputError(f"{path}: missing CSV column(s) {', '.join(missing)}; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            try:
                t = _parse_time(row[ts_col])
                n_in, n_out = int(float(row[in_col])), int(float(row[out_col]))
            except (TypeError, ValueError) as exc:
                raise InputError(f"{path}:{line}: cannot parse row ({exc})") from None
            records.append(TraceRecord(t, max(n_in, 1), max(n_out, 1)))
    return _rebase(path, records)


def _rebase(path: str, records: list[TraceRecord]) -> list[TraceRecord]:
    if not records:
        raise InputError(f"{path}: trace holds no requests")
    records.sort(key=lambda r: r.timestamp_s)
    t0 = records[0].timestamp_s
    return [TraceRecord(r.timestamp_s - t0, r.input_len, r.output_len, r.segments, r.session_id) for r in records]


def read_azure(path: str) -> list[TraceRecord]:
    return _csv_records(path, "TIMESTAMP", "ContextTokens", "GeneratedTokens")


def read_burstgpt(path: str) -> list[TraceRecord]:
    return _csv_records(path, "Timestamp", "Request tokens", "Response tokens")


def _jsonl(path: str):
    _require(path)
    with open(path, encoding="utf-8") as fh:
        for line, text in enumerate(fh, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"{path}:{line}: invalid JSON ({exc.msg})") from None
            if not isinstance(obj, dict):
                raise InputError(f"{path}:{line}: expected a JSON object per line")
            yield line, obj


def read_mooncake(path: str) -> list[TraceRecord]:
    records = []
    for line, obj in _jsonl(path):
        try:
            t = float(obj["timestamp"]) / 1000.0
            n_in, n_out = int(obj["input_length"]), int(obj["output_length"])
            ids = [int(h) for h in obj.get("hash_ids", [])]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}:{line}: Mooncake record needs timestamp, input_length, output_length ({exc})"
            ) from None
        segments = []
        left = n_in
        for h in ids:
            take = min(MOONCAKE_BLOCK_TOKENS, left)
            if take <= 0:
                break
            segments.append((h, take))
            left -= take
        if left > 0:
            segments.append((-(line + 1), left))  # unhashed tail: unique to this request
        records.append(TraceRecord(t, max(n_in, 1), max(n_out, 1), tuple(segments)))
    return _rebase(path, records)


RAGPULSE_PART_IDS = 10_000_000  # a RAGPulse part's content ids: its index below x this + the trace's id


def ragpulse_part(content_id: int) -> str | None:
    """Which RAGPulse part a segment's content id names (None: the request's own, unnamed tail)."""
    index = content_id // RAGPULSE_PART_IDS
    return RAGPULSE_PARTS[index][0] if content_id >= 0 and index < len(RAGPULSE_PARTS) else None


RAGPULSE_PARTS = (
    ("sys_prompt", "1_sys_prompt.jsonl", "sys_prompt_id"),
    ("passages_ids", "2_passages.jsonl", "passage_id"),
    ("history", "3_history.jsonl", "history_id"),
    ("web_search", "5_web_search.jsonl", "web_search_id"),
    ("user_input", "4_user_input.jsonl", "user_input_id"),
)


def read_ragpulse(path: str) -> list[TraceRecord]:
    """``0_trace.jsonl`` plus, when beside it, the per-part token-length files."""
    folder = os.path.dirname(path)
    lengths: dict[tuple[str, int], int] = {}
    for part, fname, key in RAGPULSE_PARTS:
        side = os.path.join(folder, fname)
        if os.path.exists(side):
            for _, obj in _jsonl(side):
                if key in obj and "token_length" in obj:
                    lengths[(part, int(obj[key]))] = int(obj["token_length"])
    records = []
    for line, obj in _jsonl(path):
        try:
            t = float(obj["timestamp"])
            n_in, n_out = int(obj["input_length"]), int(obj["output_length"])
            parts = obj.get("hash_ids") or {}
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"{path}:{line}: RAGPulse record needs timestamp, input_length, output_length ({exc})"
            ) from None
        segments: list[tuple[int, int]] = []
        used = 0
        for p_index, (part, _, _) in enumerate(RAGPULSE_PARTS):
            for h in parts.get(part, []) if isinstance(parts, dict) else []:
                n = lengths.get((part, int(h)), 0)
                if n <= 0 or used + n > n_in:
                    continue
                segments.append((p_index * RAGPULSE_PART_IDS + int(h), n))
                used += n
        if used < n_in:
            segments.append((-(line + 1), n_in - used))
        records.append(TraceRecord(t, max(n_in, 1), max(n_out, 1), tuple(segments), obj.get("session_id")))
    return _rebase(path, records)


READERS = {
    "azure": read_azure,
    "mooncake": read_mooncake,
    "burstgpt": read_burstgpt,
    "ragpulse": read_ragpulse,
}


def read_trace(path: str, fmt: str) -> list[TraceRecord]:
    if fmt not in READERS:
        raise InputError(f"trace format {fmt!r} is unknown; use one of {', '.join(READERS)}")
    _require(path)
    try:
        return READERS[fmt](path)
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}); is it a trace in {fmt} format?") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
