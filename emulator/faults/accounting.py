"""What each fault cost: requests before, during and after its window, and how long recovery took.

Windows are by arrival time (emulated seconds since the first request): ``before`` and ``after``
are as long as the fault (at least 5 s), so the three compare like with like. Every request
falls in exactly one outcome: completed, failed (by reason: the router's OpenAI error code) or
lost (no answer within the client's deadline) — the report shows lost must be 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from emulator.results import LOST, RequestRecord, failure_reasons

MIN_WINDOW_S = 5.0
RECOVERY_RUN = 10  # recovered once this many consecutive arrivals meet the SLOs as often as before


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def window_stats(records: Sequence[RequestRecord], lo: float, hi: float, ttft_ms: float, tpot_ms: float) -> dict:
    inside = [r for r in records if lo <= r.arrival_s < hi]
    done = [r for r in inside if r.ok]
    ttfts = [r.ttft_ms for r in done if r.ttft_ms is not None]
    tpots = [r.tpot_ms for r in done if r.tpot_ms is not None]
    return {
        "from_s": lo,
        "to_s": hi,
        "sent": len(inside),
        "completed": len(done),
        "failed": len(inside) - len(done),
        "failed_by_reason": failure_reasons(inside),
        "lost": sum(1 for r in inside if r.error_code == LOST),
        "ttft_ms_p50": _pct(ttfts, 50),
        "ttft_ms_p99": _pct(ttfts, 99),
        "tpot_ms_p50": _pct(tpots, 50),
        "tpot_ms_p99": _pct(tpots, 99),
        "slo_attainment": sum(r.meets(ttft_ms, tpot_ms) for r in inside) / len(inside) if inside else None,
    }


def recovery_s(records: Sequence[RequestRecord], end: float, target: float | None, ttft_ms: float, tpot_ms: float):
    """Seconds from the fault's end until RECOVERY_RUN consecutive arrivals meet the SLOs at least as
    often as before it (less 5 points); None when that never happened in the run."""
    if target is None:
        return None
    after = sorted((r for r in records if r.arrival_s >= end), key=lambda r: r.arrival_s)
    met = np.array([r.meets(ttft_ms, tpot_ms) for r in after], dtype=float)
    if len(met) < RECOVERY_RUN:
        return None
    rolling = np.convolve(met, np.ones(RECOVERY_RUN) / RECOVERY_RUN, mode="valid")
    ok = np.nonzero(rolling >= target - 0.05)[0]
    return float(after[int(ok[0])].arrival_s - end) if len(ok) else None


def fault_accounting(
    records: Sequence[RequestRecord], timeline: list[dict], ttft_ms: float, tpot_ms: float, run_end_s: float
) -> list[dict]:
    """One entry per fault of the timeline (``name``, ``kind``, ``targets``, ``start_s``, ``end_s``)."""
    out = []
    for f in timeline:
        start = f["start_s"]
        end = f["end_s"] if f.get("end_s") is not None else run_end_s
        span = max(end - start, MIN_WINDOW_S)
        before = window_stats(records, max(0.0, start - span), start, ttft_ms, tpot_ms)
        during = window_stats(records, start, max(end, start + 1e-9), ttft_ms, tpot_ms)
        after = window_stats(records, end, end + span, ttft_ms, tpot_ms)
        out.append(
            {
                **f,
                "end_s": end,
                "before": before,
                "during": during,
                "after": after,
                "recovery_s": recovery_s(records, end, before["slo_attainment"], ttft_ms, tpot_ms),
            }
        )
    return out
