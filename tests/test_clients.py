"""Closed-loop clients as benchmark clients behave (phases, overhead, drift) and prompt reuse."""

from __future__ import annotations

import numpy as np
import pytest

from emulator.results import summarize
from emulator.sim.simulator import simulate
from emulator.spec import parse_cluster
from emulator.workload.clients import ClientBehaviour, ClosedLoopClients
from emulator.workload.plan import build_plan


def cluster(workload: dict, **spec):
    doc = {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "InferenceCluster",
        "metadata": {"name": "c"},
        "spec": {
            "model": "llama-3.1-8b",
            "gpu": "h100-sxm",
            "topology": {"nodes": 1, "gpusPerNode": 1},
            "pools": [{"name": "agg", "maxModelLen": 4096}],
            "workload": workload,
            **spec,
        },
    }
    return parse_cluster(doc)


def test_the_measured_phase_starts_only_when_every_warmup_request_is_back():
    c = ClosedLoopClients(4, 12, ClientBehaviour(warmup=4), np.random.default_rng(0))
    first = c.start(0.0)
    assert [i for _, i in first] == [0, 1, 2, 3]
    assert c.on_done(0, 1.0) == [] and c.on_done(1, 1.1) == [] and c.on_done(2, 1.2) == []
    burst = c.on_done(3, 2.0)  # the last warm-up request: C measured requests at once
    assert [i for _, i in burst] == [4, 5, 6, 7] and all(t == 2.0 for t, _ in burst)
    assert c.is_warmup(3) and not c.is_warmup(4)


def test_client_overhead_is_random_with_the_given_mean():
    c = ClosedLoopClients(1, 20001, ClientBehaviour(overhead_s=0.005, overhead_cv=1.0), np.random.default_rng(1))
    c.start(0.0)
    gaps = [c.on_done(i, 0.0)[0][0] for i in range(20000)]
    assert np.mean(gaps) == pytest.approx(0.005, rel=0.03)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.05)


def test_clients_that_start_together_drift_apart():
    """No lock-step: with random client overheads (real clients) the sends spread over the cycle and
    the steady-state TTFT drops below that of clients with a fixed overhead, which keep prefilling
    together round after round. Compared with each other, not with a number that moves with the
    cost model."""

    def run(cv: float):
        wl = {
            "arrival": {"type": "concurrency", "n": 16},
            "requests": 160,
            "inputLength": {"type": "fixed", "value": 512},
            "outputLength": {"type": "fixed", "value": 64},
            "client": {"overheadMs": 5.0, "overheadCv": cv},
        }
        res = simulate(cluster(wl), build_plan(cluster(wl).spec.workload))
        sends = np.array([r.arrival_s for r in res.records])
        assert np.ptp(sends[:16]) == 0.0  # the benchmark starts every client at once
        return np.ptp(sends[-16:]), np.mean([r.ttft_ms for r in res.records[32:]])

    spread, ttft = run(1.0)
    fixed_spread, fixed_ttft = run(0.0)
    assert spread > 1.3 * fixed_spread  # ten rounds later the random clients no longer send together
    assert ttft < 0.95 * fixed_ttft  # ... so fewer prefills queue behind each other


def test_warmup_requests_are_not_reported():
    wl = {
        "arrival": {"type": "concurrency", "n": 4},
        "requests": 20,
        "inputLength": {"type": "fixed", "value": 256},
        "outputLength": {"type": "fixed", "value": 16},
        "client": {"warmupRequests": 8},
    }
    c = cluster(wl)
    plan = build_plan(c.spec.workload)
    assert len(plan.requests) == 28 and plan.warmup == 8
    res = simulate(c, plan)
    assert res.summary["requests"] == 20 and res.records[0].request_id == "req-8"


@pytest.mark.parametrize("pool", [10, 100])
def test_prompt_reuse_gives_the_expected_prefix_hit_rate(pool):
    """K distinct prompts drawn at random for N requests: N - K(1 - (1 - 1/K)^N) repeats, each a full
    hit but for its last block (the cache holds every prompt here)."""
    n, isl, bs = 300, 1024, 16
    wl = {
        "arrival": {"type": "concurrency", "n": 4},
        "requests": n,
        "inputLength": {"type": "fixed", "value": isl},
        "outputLength": {"type": "fixed", "value": 8},
        "client": {"promptPool": pool},
    }
    c = cluster(wl)
    plan = build_plan(c.spec.workload)
    distinct = len({p.segments for p in plan.requests})
    expected_distinct = pool * (1 - (1 - 1 / pool) ** n)
    assert distinct == pytest.approx(expected_distinct, abs=4 * np.sqrt(expected_distinct))
    res = simulate(c, plan)
    hit_tokens = sum(r.cached_tokens for r in res.records)
    per_hit = (isl - 1) // bs * bs  # at least one prompt token is always recomputed
    assert hit_tokens == pytest.approx((n - distinct) * per_hit, rel=0.02)


def test_cli_flags_set_the_client_model(tmp_path):
    from emulator.overrides import WorkloadOverrides, apply_overrides

    wl = {"arrival": {"type": "poisson"}, "rate": 1, "requests": 10}
    c = apply_overrides(
        cluster(wl), WorkloadOverrides(concurrency=8, warmup_requests=16, prompt_pool=100, max_connections=4)
    )
    client = c.spec.workload.client
    assert (client.warmup_requests, client.prompt_pool, client.max_connections) == (16, 100, 4)
    assert build_plan(c.spec.workload).warmup == 16


def test_a_client_with_fewer_connections_than_clients_queues_the_rest_and_counts_the_wait_in_ttft():
    """16 clients sharing 4 connections (aiohttp's pool): the server never holds more than 4 requests,
    and by Little's law each request's end-to-end time is 16 / 4 times that of 4 clients with a
    connection each. The wait comes before the first token, so TTFT carries it."""

    def run(n: int, connections: int | None):
        wl = {
            "arrival": {"type": "concurrency", "n": n},
            "requests": 20 * n,
            "inputLength": {"type": "fixed", "value": 512},
            "outputLength": {"type": "fixed", "value": 64},
            "client": {"overheadMs": 0.0, "maxConnections": connections},
        }
        c = cluster(wl)
        return simulate(c, build_plan(c.spec.workload)).records

    limited, own = run(16, 4), run(4, None)
    assert len(limited) == 320 and all(r.ok for r in limited)
    # at no moment does the server hold more than 4 of the 16 clients' requests
    events = sorted([(r.first_scheduled_s, 1) for r in limited] + [(r.finish_s, -1) for r in limited])
    assert max(np.cumsum([d for _, d in events])) == 4
    steady = slice(80, 240)  # rounds 5-15 of 20: past the first burst, before the clients run out
    e2e_limited = np.mean([r.finish_s - r.arrival_s for r in limited[steady]])
    e2e_own = np.mean([r.finish_s - r.arrival_s for r in own[20:60]])
    assert e2e_limited == pytest.approx(4 * e2e_own, rel=0.05)
    ttft_limited = np.mean([r.ttft_ms for r in limited[steady]])
    ttft_own = np.mean([r.ttft_ms for r in own[20:60]])
    assert ttft_limited - ttft_own == pytest.approx((e2e_limited - e2e_own) * 1e3, rel=0.05)
    # each record says how long it waited for a connection, and the summary counts who waited
    wait = np.mean([r.client_wait_ms for r in limited[steady]])
    assert wait == pytest.approx(ttft_limited - ttft_own, rel=0.05)
    assert all(r.client_wait_ms == 0 for r in limited[:4]) and all(r.client_wait_ms == 0 for r in own)
    assert summarize(limited, 1e9, 1e9)["client_waited"] == sum(r.client_wait_ms > 0 for r in limited) >= 300
    assert "client_waited" not in summarize(own, 1e9, 1e9)
    # no limit at all: every client's request reaches the server at once
    unlimited = run(16, None)
    events = sorted([(r.first_scheduled_s, 1) for r in unlimited] + [(r.finish_s, -1) for r in unlimited])
    assert max(np.cumsum([d for _, d in events])) == 16
