"""The request plan: when each request arrives and how long its prompt and output are.

A pure function of the workload spec and the seed, read by the simulator now and
by the load generator's dispatcher (issue "Load"), so both see the same requests.
Arrival times and lengths draw from separate RNG streams.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import numpy as np

from emulator.errors import InputError
from emulator.rng import PartitionedRNG
from emulator.spec import (
    ConcurrencyArrival,
    ConstantArrival,
    FixedLength,
    GammaArrival,
    LognormalLength,
    MMPPArrival,
    PipelineSpec,
    PoissonArrival,
    TraceArrival,
    TraceLength,
    UniformLength,
    WorkloadSpec,
)
from emulator.workload.traces import TraceRecord, read_trace

MAX_PLANNED = 5_000_000


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    arrival_s: float | None  # None: closed loop, sent when a client is free
    input_len: int
    output_len: int
    segments: tuple[tuple[int, int], ...] = ()
    pipeline: PipelineSpec | None = None  # a multi-stage request (workload.pipeline / pipelines)


@dataclass(frozen=True)
class RequestPlan:
    requests: tuple[PlannedRequest, ...]
    concurrency: int | None = None  # closed-loop clients; None = open loop
    duration_s: float | None = None
    warmup: int = 0  # closed loop: the first `warmup` requests are the unreported warm-up phase

    def is_warmup(self, index: int) -> bool:
        return index < self.warmup


def inter_arrivals(rng: np.random.Generator, arrival, rate: float, n: int) -> np.ndarray:
    """n inter-arrival gaps with mean 1/rate: exponential (CV 1), Gamma with a CV, or constant."""
    mean = 1.0 / rate
    if isinstance(arrival, PoissonArrival):
        return rng.exponential(mean, n)
    if isinstance(arrival, GammaArrival):
        shape = 1.0 / arrival.cv**2
        return rng.gamma(shape, mean / shape, n)
    if isinstance(arrival, ConstantArrival):
        return np.full(n, mean)
    raise TypeError(f"no inter-arrival law for {type(arrival).__name__}")


def mmpp_times(rng: np.random.Generator, arrival: MMPPArrival, n: int | None, duration: float | None) -> np.ndarray:
    """Arrival times of an on/off MMPP: alternate exponential burst/idle periods, Poisson within each."""
    times: list[float] = []
    t, bursting = 0.0, True
    limit = duration if duration is not None else float("inf")
    while t < limit and (n is None or len(times) < n):
        span = rng.exponential(arrival.burst_seconds if bursting else arrival.idle_seconds)
        rate = arrival.burst_rate if bursting else arrival.idle_rate
        if rate > 0:
            k = rng.poisson(rate * span)
            times.extend(np.sort(t + rng.uniform(0, span, k)).tolist())
        t += span
        bursting = not bursting
        if len(times) > MAX_PLANNED:
            raise InputError(f"spec.workload.arrival: the MMPP plans more than {MAX_PLANNED} requests")
    out = np.asarray(times)
    out = out[out < limit]
    return out[:n] if n is not None else out


def sample_lengths(rng: np.random.Generator, dist, n: int) -> np.ndarray:
    if isinstance(dist, FixedLength):
        return np.full(n, dist.value, dtype=np.int64)
    if isinstance(dist, UniformLength):
        return rng.integers(dist.min, dist.max + 1, n)
    if isinstance(dist, LognormalLength):
        mu = np.log(dist.mean) - dist.sigma**2 / 2  # so that E[length] = mean
        vals = np.rint(rng.lognormal(mu, dist.sigma, n)).astype(np.int64)
        return np.clip(vals, dist.min, dist.max)
    raise TypeError(f"cannot sample {type(dist).__name__} without a trace")


PROMPT_POOL_ID = 7_000_000_000  # content ids of pooled prompts (far from trace hash ids)


def prompt_segments(rng: PartitionedRNG, wl: WorkloadSpec, lengths: np.ndarray) -> list[tuple[tuple[int, int], ...]]:
    """Content of each prompt when the client draws from a dataset of K distinct prompts.

    Benchmark clients pick each request's prompt at random from their dataset (AIPerf 0.3's
    ``DatasetManager._return_any_conversation``: ``random.choice`` over 100 synthetic entries by
    default); a repeat of the same prompt shares every block and can be served from the prefix
    cache. Without a pool every prompt is distinct (no segments: nothing to share).
    """
    k = wl.client.prompt_pool
    n = len(lengths)
    if k is None:
        return [()] * n
    picks = rng.for_subsystem("workload.prompts").integers(0, k, n)
    return [((PROMPT_POOL_ID + int(picks[i]), int(lengths[i])),) for i in range(n)]


def detect_trace_format(path: str) -> str:
    """Guess a trace's format from its header or first record."""
    if not os.path.isfile(path):
        raise InputError(f"{path}: trace file not found" if not os.path.exists(path) else f"{path}: not a file")
    with open(path, encoding="utf-8", errors="replace") as fh:
        head = fh.readline()
    if "ContextTokens" in head:
        return "azure"
    if "Request tokens" in head:
        return "burstgpt"
    if head.lstrip().startswith("{"):
        return "ragpulse" if '"sys_prompt"' in head or '"session_id"' in head else "mooncake"
    raise InputError(
        f"{path}: cannot tell the trace format from its first line;"
        " pass --trace-format azure|mooncake|burstgpt|ragpulse"
    )


def build_plan(wl: WorkloadSpec, base_dir: str | None = None) -> RequestPlan:
    return with_pipelines(_requests_plan(wl, base_dir), wl)


def with_pipelines(plan: RequestPlan, wl: WorkloadSpec) -> RequestPlan:
    """Each request's pipeline: the one of ``workload.pipeline``, or one of ``workload.pipelines`` drawn by
    weight (the plan's own RNG stream, in plan order: the same spec and seed give the same mix)."""
    mix = wl.pipeline_mix
    if not mix:
        return plan
    cum = np.cumsum([p.weight for p in mix])
    u = PartitionedRNG(wl.seed).for_subsystem("workload.pipelines").random(len(plan.requests)) * cum[-1]
    picks = np.minimum(np.searchsorted(cum, u, side="right"), len(mix) - 1)
    return replace(plan, requests=tuple(replace(r, pipeline=mix[k]) for r, k in zip(plan.requests, picks, strict=True)))


def _requests_plan(wl: WorkloadSpec, base_dir: str | None = None) -> RequestPlan:
    rng = PartitionedRNG(wl.seed)
    arrival = wl.arrival
    if isinstance(arrival, TraceArrival):
        return _trace_plan(wl, arrival, rng, base_dir)
    if isinstance(arrival, ConcurrencyArrival):
        warmup = wl.client.warmup_requests
        n = (wl.requests or max(1, int((wl.duration or 60) * (wl.rate or 1.0)))) + warmup
        ins = sample_lengths(rng.for_subsystem("workload.input"), wl.input_length, n)
        outs = sample_lengths(rng.for_subsystem("workload.output"), wl.output_length, n)
        segs = prompt_segments(rng, wl, ins)
        reqs = tuple(PlannedRequest(i, None, int(ins[i]), int(outs[i]), segs[i]) for i in range(n))
        return RequestPlan(reqs, concurrency=arrival.n, duration_s=wl.duration, warmup=warmup)
    if isinstance(arrival, MMPPArrival):
        times = mmpp_times(rng.for_subsystem("workload.arrivals"), arrival, wl.requests, wl.duration)
        n = len(times)
        ins = sample_lengths(rng.for_subsystem("workload.input"), wl.input_length, n)
        outs = sample_lengths(rng.for_subsystem("workload.output"), wl.output_length, n)
        return RequestPlan(
            tuple(PlannedRequest(i, float(times[i]), int(ins[i]), int(outs[i])) for i in range(n)),
            duration_s=wl.duration,
        )
    rate = wl.rate
    if rate is None:
        raise InputError("spec.workload.rate: required for open-loop arrivals")
    arr_rng = rng.for_subsystem("workload.arrivals")
    if wl.requests is not None:
        gaps = inter_arrivals(arr_rng, arrival, rate, wl.requests)
        times = np.concatenate([[0.0], np.cumsum(gaps[1:])]) if wl.requests else np.zeros(0)
        if wl.duration is not None:
            times = times[times < wl.duration]
    else:
        expected = int(wl.duration * rate * 1.2) + 16
        if expected > MAX_PLANNED:
            raise InputError(f"spec.workload: rate x duration plans {expected} requests; the limit is {MAX_PLANNED}")
        gaps = inter_arrivals(arr_rng, arrival, rate, expected)
        times = np.concatenate([[0.0], np.cumsum(gaps[1:])])
        while times[-1] < wl.duration:
            more = inter_arrivals(arr_rng, arrival, rate, expected)
            times = np.concatenate([times, times[-1] + np.cumsum(more)])
        times = times[times < wl.duration]
    n = len(times)
    ins = sample_lengths(rng.for_subsystem("workload.input"), wl.input_length, n)
    outs = sample_lengths(rng.for_subsystem("workload.output"), wl.output_length, n)
    segs = prompt_segments(rng, wl, ins)
    reqs = tuple(PlannedRequest(i, float(times[i]), int(ins[i]), int(outs[i]), segs[i]) for i in range(n))
    return RequestPlan(reqs, duration_s=wl.duration)


def _trace_plan(wl: WorkloadSpec, arrival: TraceArrival, rng: PartitionedRNG, base_dir: str | None) -> RequestPlan:
    path = arrival.path
    if not os.path.isabs(path) and not os.path.exists(path) and base_dir:
        candidate = os.path.join(base_dir, path)
        if os.path.exists(candidate):
            path = candidate
    records: list[TraceRecord] = read_trace(path, arrival.format)
    if wl.duration is not None:
        records = [r for r in records if r.timestamp_s * arrival.time_scale < wl.duration]
    if wl.requests is not None:
        records = records[: wl.requests]
    n = len(records)
    if isinstance(wl.input_length, TraceLength):
        ins = np.array([r.input_len for r in records], dtype=np.int64)
    else:
        ins = sample_lengths(rng.for_subsystem("workload.input"), wl.input_length, n)
    if isinstance(wl.output_length, TraceLength):
        outs = np.array([r.output_len for r in records], dtype=np.int64)
    else:
        outs = sample_lengths(rng.for_subsystem("workload.output"), wl.output_length, n)
    reqs = []
    for i, r in enumerate(records):
        segments = r.segments if int(ins[i]) == r.input_len else ()
        reqs.append(PlannedRequest(i, r.timestamp_s * arrival.time_scale, int(ins[i]), int(outs[i]), segments))
    return RequestPlan(tuple(reqs), duration_s=wl.duration)


def add_bursts(plan: RequestPlan, wl: WorkloadSpec, faults) -> RequestPlan:
    """The plan with each ``burst`` fault's extra arrivals: Poisson at (factor - 1) x the rate over its
    window, lengths from the workload's own laws (their own RNG streams), so the total rate there is
    factor x the rate. Requests are re-indexed by arrival; a plan without bursts is returned as is."""
    bursts = [f for f in faults if f.kind == "burst"]
    if not bursts or plan.concurrency or wl.rate is None:
        return plan
    rng = PartitionedRNG(wl.seed)
    extra: list[tuple[float, int, int]] = []
    for k, f in enumerate(bursts):
        start = f.at_seconds if f.at_seconds is not None else _arrival_of(plan, f.after_requests)
        rate = (f.factor - 1.0) * wl.rate
        n = int(rng.for_subsystem(f"faults.burst.{k}.count").poisson(rate * f.duration_seconds))
        if n == 0:
            continue
        times = np.sort(start + rng.for_subsystem(f"faults.burst.{k}.times").uniform(0, f.duration_seconds, n))
        ins = sample_lengths(rng.for_subsystem(f"faults.burst.{k}.input"), wl.input_length, n)
        outs = sample_lengths(rng.for_subsystem(f"faults.burst.{k}.output"), wl.output_length, n)
        extra += [(float(times[i]), int(ins[i]), int(outs[i])) for i in range(n)]
    if len(plan.requests) + len(extra) > MAX_PLANNED:
        raise InputError(f"spec.faults: the bursts plan more than {MAX_PLANNED} requests")
    merged = sorted(
        [(p.arrival_s or 0.0, p.input_len, p.output_len, p.segments) for p in plan.requests]
        + [(t, i, o, ()) for t, i, o in extra],
        key=lambda r: r[0],
    )
    reqs = tuple(PlannedRequest(i, t, n_in, n_out, seg) for i, (t, n_in, n_out, seg) in enumerate(merged))
    return with_pipelines(RequestPlan(reqs, duration_s=plan.duration_s, warmup=plan.warmup), wl)


def _arrival_of(plan: RequestPlan, index: int | None) -> float:
    if not plan.requests or index is None:
        return 0.0
    return plan.requests[min(index, len(plan.requests) - 1)].arrival_s or 0.0


def plan_for(cluster, base_dir: str | None = None) -> RequestPlan:
    """The cluster's workload plan with its burst faults' arrivals (what sim and run both play)."""
    return add_bursts(build_plan(cluster.spec.workload, base_dir), cluster.spec.workload, cluster.spec.faults)
