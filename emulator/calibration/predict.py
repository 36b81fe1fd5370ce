"""Simulate one calibration row as its benchmark ran it, and read off mean TTFT and TPOT.

The benchmark sends ``rounds x C`` measured requests from ``C`` closed-loop clients after
a drained warm-up phase; its means weigh the first round (all clients start together),
the steady middle and the tail (clients running out of requests) as they happened. A run
with fewer rounds than the benchmark (to save time on rows with thousands of clients)
keeps that weighting: first and last rounds as simulated, the middle rounds' mean standing
for every middle round of the real run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from emulator.calibration.express import BENCHMARK_ROUNDS, Expressed
from emulator.costmodel.engines import EngineProfile
from emulator.sim.simulator import simulate
from emulator.workload.plan import build_plan


@dataclass(frozen=True)
class Prediction:
    row_id: str
    ttft_ms: float | None
    tpot_ms: float | None
    requests: int
    failed: int
    error: str | None
    wall_s: float
    mean_batch: float = 0.0  # decoded tokens per engine step (the host-side model's batch)
    prefill_share: float = 0.0  # prompt tokens per decoded token: how much prefill work each step carries


def _round_weighted(values: np.ndarray, c: int, rounds: int, benchmark_rounds: int) -> float:
    if rounds >= benchmark_rounds or rounds < 3 or len(values) < rounds * c:
        return float(np.mean(values))
    per_round = values[: rounds * c].reshape(rounds, c).mean(axis=1)
    middle = float(per_round[1:-1].mean())
    return (per_round[0] + (benchmark_rounds - 2) * middle + per_round[-1]) / benchmark_rounds


def predict(
    ex: Expressed, benchmark_rounds: int = BENCHMARK_ROUNDS, profile: EngineProfile | None = None
) -> Prediction:
    """``profile``: other engine constants than the shipped ones (the fit and cross-validation)."""
    t0 = time.perf_counter()
    cluster = ex.cluster
    plan = build_plan(cluster.spec.workload)
    result = simulate(cluster, plan, profile=profile)
    records = result.records  # measured requests, in send order
    failed = [r for r in records if not r.ok]
    wall = time.perf_counter() - t0
    expected = len(plan.requests) - plan.warmup
    if len(records) < expected:
        return Prediction(
            ex.row.id,
            None,
            None,
            len(records),
            expected - len(records),
            f"only {len(records)} of {expected} measured requests were sent: the warm-up never drained",
            wall,
        )
    if failed:
        return Prediction(ex.row.id, None, None, len(records), len(failed), failed[0].error, wall)
    stats = [s for s in result.instances.values() if s["iterations"]]
    gen = sum(s["generation_tokens"] for s in stats)
    steps = sum(s["iterations"] for s in stats)
    prompt = sum(s["prompt_tokens"] for s in stats)
    ttft = np.array([r.ttft_ms for r in records])
    tpot = np.array([r.tpot_ms if r.tpot_ms is not None else np.nan for r in records])
    c, rounds = ex.load.concurrency, ex.load.rounds
    valid = ~np.isnan(tpot)
    # requests with one output token have no TPOT: they stand at the mean of the others
    tpot_mean = (
        _round_weighted(np.where(valid, tpot, np.nanmean(tpot)), c, rounds, benchmark_rounds) if valid.any() else None
    )
    return Prediction(
        ex.row.id,
        _round_weighted(ttft, c, rounds, benchmark_rounds),
        tpot_mean,
        len(records),
        0,
        None,
        wall,
        gen / steps if steps else 0.0,
        prompt / gen if gen else 0.0,
    )
