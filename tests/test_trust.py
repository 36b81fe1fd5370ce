"""The run's first line: whether its numbers hold on this host (the workers' step timing and the same plan
through the simulator), and the time dilation that would make them hold."""

from __future__ import annotations

import copy

from conftest import example

from emulator.sim.simulator import simulate
from emulator.spec import load_clusters
from emulator.trust import suggested_dilation, trust_verdict
from emulator.workload.plan import plan_for


def _quick():
    (cluster,) = load_clusters(example("quickstart.yaml"))
    cluster = cluster.model_copy(
        update={
            "spec": cluster.spec.model_copy(
                update={"workload": cluster.spec.workload.model_copy(update={"requests": 30})}
            )
        }
    )
    plan = plan_for(cluster)
    return cluster, plan, simulate(cluster, plan).summary


def _workers(ratio: float, overloaded: bool) -> dict:
    return {
        "agg-0": {"timing_error_ratio": ratio, "timing_error_p99_s": ratio * 0.007, "overloaded": float(overloaded)}
    }


def test_a_run_that_matches_the_simulator_on_a_quiet_host_is_faithful():
    cluster, plan, summary = _quick()
    t = trust_verdict(cluster, plan, summary, _workers(0.01, False))
    assert t["verdict"] == "faithful" and t["suggested_time_dilation"] is None
    assert t["vs_simulator"]["ttft_mean"] == 0.0 and t["line"].startswith("trust: faithful at time dilation 1")


def test_an_overloaded_worker_or_a_drifting_ttft_says_so_first_with_the_dilation_that_fixes_it():
    cluster, plan, summary = _quick()
    t = trust_verdict(cluster, plan, summary, _workers(0.2, True))  # p99 at 20% of the step: D x 0.2 / 0.05 = 4
    assert t["verdict"] == "degraded" and t["suggested_time_dilation"] == 4 and t["overloaded"] == ["agg-0"]
    assert t["line"].startswith("trust: NOT faithful") and "timeDilation: 4" in t["line"]
    slow = copy.deepcopy(summary)
    slow["ttft_ms"]["mean"] *= 1.3  # the host's HTTP path shows up in TTFT: 30% over the model
    t = trust_verdict(cluster, plan, slow, _workers(0.01, False))
    assert t["verdict"] == "degraded" and t["suggested_time_dilation"] == 6  # 1 x 0.3 / 0.05
    assert trust_verdict(cluster, None, slow, _workers(0.01, False))["verdict"] == "faithful"  # Locust: timing only


def test_a_worker_with_too_few_steps_for_a_p99_is_named_as_not_judged():
    cluster, plan, summary = _quick()
    workers = _workers(0.0, False)
    workers["agg-0"]["timed_steps"] = 12.0
    t = trust_verdict(cluster, plan, summary, workers)
    assert t["untimed"] == ["agg-0"] and "not judged on agg-0: fewer than 50 steps timed" in t["line"]
    workers["agg-0"]["timed_steps"] = 400.0
    assert trust_verdict(cluster, plan, summary, workers)["untimed"] == []


def test_the_reports_line_for_a_worker_with_too_few_steps_says_not_judged_not_zero():
    """The run report once printed "step timing error p99 0.00 ms = 0.0%" for a P/D prefill that had
    timed too few steps for a p99, which read as a perfect worker."""
    from types import SimpleNamespace

    from emulator import report

    cluster, _, summary = _quick()
    workers = _workers(0.02, False)
    workers["agg-1"] = {**_workers(0.0, False)["agg-0"], "timed_steps": 12.0}
    result = SimpleNamespace(summary=summary, instances={n: {**w, "role": "aggregated"} for n, w in workers.items()})
    with report.console.capture() as out:
        report.print_summary_table(cluster, result)
    lines = out.get().splitlines()
    assert any("agg-0" in line and "step timing error p99 0.14 ms = 2.0% of the median step" in line for line in lines)
    assert any("agg-1" in line and "step timing not judged: 12 steps timed (a p99 needs 50)" in line for line in lines)


def test_the_suggested_dilation_stretches_the_step_until_the_lateness_fits_the_budget():
    assert suggested_dilation(2.0, 0.04) == 2.0  # within 5%: keep it
    assert suggested_dilation(1.0, 0.12) == 3.0  # 12% at D=1: 2.4 -> 3
    assert suggested_dilation(4.0, 0.06) == 5.0  # just over: at least one more
    assert suggested_dilation(50.0, 9.0) == 100.0  # capped at the spec's maximum
