"""Each candidate's highest rate that meets the SLO attainment target, found in the simulator.

Every simulation of every candidate plays the same request sequence (the spec's workload seed:
common random numbers), stretched to the rate tried, so candidates differ by their design and
not by their luck. The rate is bracketed from the cost model's bound, then bisected until the
bracket is within ``RATE_PRECISION``; the term that fails first above it (TTFT or TPOT) is the one
that binds. Candidates run in a process pool; past the time budget, the rest are reported as not
searched rather than silently dropped.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
import time
from dataclasses import dataclass, field

from emulator.planner.candidates import Candidate, deployment_doc

RATE_PRECISION = 0.03  # stop bisecting when the bracket is within 3% of its top
MAX_DOUBLINGS = 8


@dataclass(frozen=True)
class Problem:
    """What every search worker needs: the spec to vary, the SLO and the plan's size."""

    base: dict  # the user's spec document (camelCase), SLOs already applied
    requests: int  # simulated requests per rate tried
    target: float  # SLO attainment target
    ttft_ms: float
    tpot_ms: float
    deadline: float = math.inf  # wall clock (time.time()) after which no new candidate starts


@dataclass
class Measurement:
    rate: float
    attainment: float
    ttft_share: float  # requests meeting the TTFT SLO
    tpot_share: float  # requests meeting the TPOT SLO


@dataclass
class Outcome:
    candidate: Candidate
    max_rate: float = 0.0  # req/s one unit sustains at the attainment target
    attainment: float = 0.0  # at max_rate
    binding: str = ""  # ttft | tpot: the SLO term that fails first above max_rate
    sims: int = 0
    wall_s: float = 0.0
    note: str = ""
    tried: list[Measurement] = field(default_factory=list)

    @property
    def goodput_per_gpu(self) -> float:
        return self.max_rate / self.candidate.unit_gpus


def measure(problem: Problem, cand: Candidate, rate: float, units: int = 1) -> Measurement:
    """Simulate ``units`` copies of the candidate at ``rate`` and read attainment and its terms."""
    from emulator.sim.simulator import simulate
    from emulator.spec import parse_cluster
    from emulator.workload.plan import plan_for

    cluster = parse_cluster(deployment_doc(problem.base, cand, units, rate, problem.requests))
    result = simulate(cluster, plan_for(cluster))
    recs = result.records
    n = max(len(recs), 1)
    ttft_ok = sum(1 for r in recs if r.ok and r.ttft_ms is not None and r.ttft_ms <= problem.ttft_ms) / n
    tpot_ok = sum(1 for r in recs if r.ok and (r.tpot_ms is None or r.tpot_ms <= problem.tpot_ms)) / n
    return Measurement(rate, float(result.summary["slo_attainment"]), ttft_ok, tpot_ok)


def find_max_rate(problem: Problem, cand: Candidate, start: float) -> Outcome:
    """Bracket, then bisect: the largest rate whose attainment meets the target (attainment falls
    with the rate; common random numbers keep that true run to run)."""
    t0 = time.perf_counter()
    out = Outcome(cand)
    if time.time() > problem.deadline:
        out.note = "not searched: the --budget-s ran out"
        return out

    def meets(rate: float) -> bool:
        m = measure(problem, cand, rate)
        out.tried.append(m)
        out.sims += 1
        return m.attainment >= problem.target

    lo, hi = 0.0, max(start, 1e-3)
    for _ in range(MAX_DOUBLINGS):
        if not meets(hi):
            break
        lo, hi = hi, hi * 2
    else:
        out.note = f"still meets the target at {hi / 2:.3g} req/s (the bound looked too low)"
    if lo == 0.0:
        small = hi / 32
        if not meets(small):
            out.note = f"misses the target even at {small:.3g} req/s"
            out.binding = _binding(out.tried[-1])
            out.wall_s = time.perf_counter() - t0
            return out
        lo = small
    while (hi - lo) > RATE_PRECISION * hi:
        mid = (lo + hi) / 2
        if meets(mid):
            lo = mid
        else:
            hi = mid
    out.max_rate = lo
    at_lo = [m for m in out.tried if m.rate == lo]
    out.attainment = at_lo[-1].attainment if at_lo else 0.0
    above = min((m for m in out.tried if m.rate > lo), key=lambda m: m.rate, default=None)
    out.binding = _binding(above) if above is not None else ""
    out.wall_s = time.perf_counter() - t0
    return out


def _binding(m: Measurement) -> str:
    if abs(m.ttft_share - m.tpot_share) < 0.02:
        return "ttft+tpot"
    return "ttft" if m.ttft_share < m.tpot_share else "tpot"


def _job(args: tuple[Problem, Candidate, float]) -> Outcome:
    problem, cand, start = args
    try:
        return find_max_rate(problem, cand, start)
    except Exception as exc:  # one candidate's failure is reported with the rest, not a crash
        return Outcome(cand, note=f"simulation failed: {exc}")


def _worker_signals() -> None:
    """Pool workers die quietly on SIGTERM (the CLI's handler turns it into KeyboardInterrupt) and
    leave Ctrl-C to the parent, which stops them."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def search(problem: Problem, candidates: list[tuple[Candidate, float]], jobs: int) -> list[Outcome]:
    """Every candidate's outcome, best goodput per GPU first."""
    tasks = [(problem, cand, start) for cand, start in candidates]
    if jobs <= 1 or len(tasks) <= 1:
        outcomes = [_job(t) for t in tasks]
    else:
        pool = multiprocessing.get_context("fork").Pool(jobs, initializer=_worker_signals)
        try:
            outcomes = list(pool.imap_unordered(_job, tasks))
        except BaseException:
            pool.terminate()  # Ctrl-C: stop the simulations in flight
            raise
        else:
            pool.close()  # every task is done: let the workers exit on their own
        finally:
            pool.join()
    return sorted(outcomes, key=lambda o: (-o.goodput_per_gpu, o.candidate.unit_gpus, o.candidate.label()))
