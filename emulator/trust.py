"""Whether an emulated run can be trusted, said in one line: the workers' own step-timing error and the
same plan through the simulator.

Every worker measures how late its engine steps wake against the modelled step (the timing-error
histogram; ``infemu_emulation_overloaded`` when the p99 exceeds 5% of the median step). A busy host
adds its own latency to every step and every request, so a run is reported *faithful* only when no
worker was overloaded and the run's TTFT and TPOT means stay within 10% and 5% of what the simulator
gives for the very same plan. Otherwise the line says so first, with the time dilation that would fix
it: the lateness is wall time while a modelled step lasts D times longer, so the ratio falls as 1/D.
"""

from __future__ import annotations

import math

TIMING_BUDGET = 0.05  # the step-timing error p99 a faithful worker stays under, as a share of its median step
MIN_TIMED_STEPS = 50  # a worker publishes its step-timing p99 (and so its verdict) from this many steps on
TTFT_BOUND, TPOT_BOUND = 0.10, 0.05  # emulated vs simulated means


def timing_judged(stats: dict) -> bool:
    """Whether a worker timed enough steps for a step-timing p99 (scraped stats without the count: yes)."""
    return stats.get("timed_steps", MIN_TIMED_STEPS) >= MIN_TIMED_STEPS


def suggested_dilation(dilation: float, share_of_step: float) -> float:
    """The time dilation that brings a worker's step-timing error p99 (``share_of_step`` of its median
    step at ``dilation``) under the budget: the lateness stays, the step stretches with D."""
    if share_of_step <= TIMING_BUDGET:
        return dilation
    return float(min(100, max(math.ceil(dilation * share_of_step / TIMING_BUDGET - 1e-9), math.ceil(dilation) + 1)))


def trust_verdict(cluster, plan, summary: dict, instances: dict) -> dict:
    """``plan``: what the run played (None for Locust load: no simulator comparison)."""
    dilation = cluster.spec.emulation.time_dilation
    engines = {n: st for n, st in instances.items() if "timing_error_ratio" in st}
    worst = max(engines.items(), key=lambda kv: kv[1]["timing_error_ratio"], default=(None, {}))
    ratio = worst[1].get("timing_error_ratio", 0.0)
    out: dict = {
        "time_dilation": dilation,
        "worst_step_timing": {"instance": worst[0], "p99_ms": 1e3 * worst[1].get("timing_error_p99_s", 0.0),
                              "share_of_step": ratio},
        "overloaded": sorted(n for n, st in engines.items() if st.get("overloaded")),
        # too few steps for a p99: their timing is not judged (a very short run, or a large dilation)
        "untimed": sorted(n for n, st in engines.items() if not timing_judged(st)),
    }  # fmt: skip
    needed = dilation * ratio / TIMING_BUDGET if out["overloaded"] else 1.0
    if plan is not None and summary.get("completed"):
        from emulator.sim.simulator import simulate

        sim = simulate(cluster, plan).summary
        diff = {}
        for key in ("ttft_ms", "tpot_ms"):
            emu_mean, sim_mean = summary[key]["mean"], sim[key]["mean"]
            diff[key] = None if not emu_mean or not sim_mean else emu_mean / sim_mean - 1.0
        out["vs_simulator"] = {"ttft_mean": diff["ttft_ms"], "tpot_mean": diff["tpot_ms"]}
        if diff["ttft_ms"] is not None and abs(diff["ttft_ms"]) > TTFT_BOUND:
            needed = max(needed, dilation * abs(diff["ttft_ms"]) / (TTFT_BOUND / 2))
        if diff["tpot_ms"] is not None and abs(diff["tpot_ms"]) > TPOT_BOUND:
            needed = max(needed, dilation * abs(diff["tpot_ms"]) / (TPOT_BOUND / 2))
    faithful = needed <= 1.0
    out["verdict"] = "faithful" if faithful else "degraded"
    out["suggested_time_dilation"] = (
        None if faithful else min(100, max(math.ceil(needed - 1e-9), math.ceil(dilation) + 1))
    )
    out["line"] = _line(out)
    return out


def _line(t: dict) -> str:
    w = t["worst_step_timing"]
    timing = f"step timing error p99 {w['p99_ms']:.2f} ms = {100 * w['share_of_step']:.1f}% of the median step"
    if w["instance"]:
        timing += f" (worst: {w['instance']})"
    if t["untimed"]:
        timing += f"; not judged on {', '.join(t['untimed'])}: fewer than {MIN_TIMED_STEPS} steps timed"
    vs = t.get("vs_simulator")
    versus = ""
    if vs and vs["ttft_mean"] is not None:
        tpot = 100 * (vs["tpot_mean"] or 0.0)
        versus = f"; TTFT mean {100 * vs['ttft_mean']:+.1f}%, TPOT mean {tpot:+.1f}% vs the simulator"
    if t["verdict"] == "faithful":
        return f"trust: faithful at time dilation {t['time_dilation']:g} — {timing}{versus}"
    # late steps are this host's doing; on-time steps with a gap to the simulator are the emulation's
    # own path (HTTP hops, the live router's view of the load), which a larger dilation only shrinks
    why = (
        "this host could not keep up"
        if t["overloaded"]
        else "its engines kept time but the latencies differ from the simulator's beyond 10% / 5%"
    )
    return (
        f"trust: NOT faithful — {why} at time dilation {t['time_dilation']:g} ({timing}{versus});"
        f" rerun with spec.emulation.timeDilation: {t['suggested_time_dilation']} (or on a quieter host)"
    )
