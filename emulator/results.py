"""Per-request records and the summary every driver reports with the same keys.

``summary`` keys are a public interface (``infemu sim --json``, ``infemu run``'s
``summary.json``, the LoadTest status): requests, completed, failed, duration_s,
ttft_ms, tpot_ms, e2e_ms (each {mean, p50, p90, p99}), output_tokens_per_s,
slo_attainment, failed_by_reason, lost, faults. SLO attainment follows DistServe: a request counts only when it
completed and met every SLO; failed requests count against it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

SUMMARY_KEYS = (
    "requests",
    "completed",
    "failed",
    "duration_s",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "output_tokens_per_s",
    "slo_attainment",
    "failed_by_reason",  # {error code: count}
    "lost",  # requests with no answer at all within the client's deadline (must be 0)
    "faults",  # per fault window: before / during / after and recovery (emulator.faults.accounting)
)
# present only when the cluster has them, in every driver's summary: "pipeline" (stage breakdown, per type),
# "kvstore" (hit rate, bytes fetched and written, evictions) with "kv_fetched_tokens" and "kv_fetch_ms"


@dataclass(slots=True)  # a long simulation keeps one per request: no per-instance dict
class RequestRecord:
    request_id: str
    arrival_s: float
    prompt_tokens: int
    output_tokens: int = 0
    first_token_s: float | None = None
    finish_s: float | None = None
    ok: bool = False
    error: str | None = None
    instance: str | None = None
    prefill_instance: str | None = None
    cached_tokens: int = 0
    preemptions: int = 0
    first_scheduled_s: float | None = None
    kv_transfer_s: float | None = None
    itl_max_ms: float | None = None
    # why it failed, as a short code: the OpenAI error's code (overloaded, backend_failed,
    # deadline_exceeded, no_backend, ...), http_<status>, connection, or lost (no answer at all
    # within the client's deadline: must never happen)
    error_code: str | None = None
    # a remote KV store (role kvstore): prompt tokens whose KV was fetched instead of computed, and how long
    kv_fetched_tokens: int = 0
    kv_fetch_s: float | None = None
    # time spent waiting for one of the client's connections (workload.client.maxConnections), part of TTFT
    client_wait_ms: float = 0.0
    # a multi-stage pipeline (workload.pipeline): its type, each stage's timing and the end-to-end latency
    # split by where it went (retrieval, kv_fetch, queue, prefill, reasoning, decode, network, think, api);
    # TTFT and TPOT are the final answer's, measured from the pipeline's start
    pipeline: str | None = None
    stages: list | None = None
    breakdown_ms: dict | None = None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_s is None else (self.first_token_s - self.arrival_s) * 1e3

    @property
    def e2e_ms(self) -> float | None:
        return None if self.finish_s is None else (self.finish_s - self.arrival_s) * 1e3

    @property
    def tpot_ms(self) -> float | None:
        if self.finish_s is None or self.first_token_s is None or self.output_tokens < 2:
            return None
        return (self.finish_s - self.first_token_s) / (self.output_tokens - 1) * 1e3

    @property
    def queue_ms(self) -> float | None:
        return None if self.first_scheduled_s is None else (self.first_scheduled_s - self.arrival_s) * 1e3

    def meets(self, ttft_ms: float, tpot_ms: float, e2e_ms: float | None = None) -> bool:
        if not self.ok or self.ttft_ms is None or self.ttft_ms > ttft_ms:
            return False
        if e2e_ms is not None and (self.e2e_ms is None or self.e2e_ms > e2e_ms):
            return False
        tpot = self.tpot_ms
        return tpot is None or tpot <= tpot_ms

    def to_json(self) -> dict:
        d = asdict(self)
        for k in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms"):
            d[k] = getattr(self, k)
        return d


def _stats(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    arr = np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(arr, [50, 90, 99])
    return {"mean": float(arr.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(
    records: Sequence[RequestRecord], ttft_slo_ms: float, tpot_slo_ms: float, e2e_slo_ms: float | None = None
) -> dict:
    done = [r for r in records if r.ok]
    if records:
        start = min(r.arrival_s for r in records)
        end = max((r.finish_s for r in records if r.finish_s is not None), default=start)
        duration = max(end - start, 0.0)
    else:
        duration = 0.0
    out_tokens = sum(r.output_tokens for r in done)
    met = sum(1 for r in records if r.meets(ttft_slo_ms, tpot_slo_ms, e2e_slo_ms))
    out = {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "duration_s": duration,
        "ttft_ms": _stats([r.ttft_ms for r in done if r.ttft_ms is not None]),
        "tpot_ms": _stats([r.tpot_ms for r in done if r.tpot_ms is not None]),
        "e2e_ms": _stats([r.e2e_ms for r in done if r.e2e_ms is not None]),
        "output_tokens_per_s": out_tokens / duration if duration > 0 else 0.0,
        "slo_attainment": met / len(records) if records else 0.0,
        "failed_by_reason": failure_reasons(records),
        "lost": sum(1 for r in records if r.error_code == LOST),
        "faults": [],  # a driver that played faults fills it (emulator.faults.accounting)
    }
    waited = [r for r in records if r.client_wait_ms > 0]
    if waited:  # the client's own pool held these back: their TTFT carries a wait no server caused
        out["client_waited"] = len(waited)
        out["client_wait_ms"] = _stats([r.client_wait_ms for r in waited])
    fetched = [r for r in done if r.kv_fetched_tokens]
    if fetched:
        out["kv_fetched_tokens"] = sum(r.kv_fetched_tokens for r in done)
        out["kv_fetch_ms"] = _stats([r.kv_fetch_s * 1e3 for r in fetched if r.kv_fetch_s is not None])
    piped = [r for r in done if r.breakdown_ms]
    if piped:
        keys = sorted({k for r in piped for k in r.breakdown_ms})
        types = sorted({r.pipeline for r in piped})
        out["pipeline"] = {
            "type": types[0] if len(types) == 1 else "mix",
            "stages_ms": {k: _stats([r.breakdown_ms.get(k, 0.0) for r in piped]) for k in keys},
            "by_type": {
                t: {
                    "requests": sum(r.pipeline == t for r in piped),
                    "e2e_ms": _stats([r.e2e_ms for r in piped if r.pipeline == t]),
                }
                for t in types
            },
        }
    return out


LOST = "lost"


def failure_reasons(records: Iterable[RequestRecord]) -> dict[str, int]:
    """Failed requests by ``error_code`` (``other`` when a driver gave none)."""
    out: dict[str, int] = {}
    for r in records:
        if not r.ok:
            key = r.error_code or "other"
            out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items()))


def goodput(
    records: Sequence[RequestRecord],
    ttft_slo_ms: float,
    tpot_slo_ms: float,
    duration_s: float,
    e2e_slo_ms: float | None = None,
) -> dict:
    """Requests/s and output tokens/s that met every SLO over the run's duration (the summary's
    ``duration_s``): DistServe's goodput at this one rate; ``infemu sweep`` finds the highest rate
    that keeps attainment on target."""
    met = [r for r in records if r.meets(ttft_slo_ms, tpot_slo_ms, e2e_slo_ms)]
    return {
        "requests_per_s": len(met) / duration_s if duration_s else 0.0,
        "output_tokens_per_s": sum(r.output_tokens for r in met) / duration_s if duration_s else 0.0,
        # the rates' denominator, said rather than left to guess: it includes the drain after the last
        # arrival, so 100% attainment at 12 req/s offered can read lower than 12
        "window_s": duration_s,
        "window": "first arrival to last completion",
    }


def write_jsonl(path: str, records: Iterable[RequestRecord]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r.to_json()) + "\n")
