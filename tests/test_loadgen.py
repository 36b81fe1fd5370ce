"""Load generation: arrival laws, the workload builders, Locust users against a real cluster."""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import random

import numpy as np
import pytest
from conftest import example, run_infemu, skip_if_host_lags

from emulator.spec import ConstantArrival, GammaArrival, PoissonArrival
from emulator.workload.plan import inter_arrivals
from loadgen import workloads


def _cv(x: np.ndarray) -> float:
    return float(x.std() / x.mean())


def test_poisson_inter_arrivals_mean_and_cv_within_3_percent():
    gaps = inter_arrivals(np.random.default_rng(1), PoissonArrival(), 50.0, 10_000)
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.03) and _cv(gaps) == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("cv", [0.5, 2.0])
def test_gamma_inter_arrivals_hit_the_requested_cv_within_5_percent(cv):
    gaps = inter_arrivals(np.random.default_rng(2), GammaArrival(cv=cv), 20.0, 10_000)
    assert _cv(gaps) == pytest.approx(cv, rel=0.05) and gaps.mean() == pytest.approx(1 / 20, rel=0.05)


def test_constant_arrivals_are_constant():
    assert set(inter_arrivals(np.random.default_rng(0), ConstantArrival(), 4.0, 10)) == {0.25}


def test_agentic_sessions_grow_their_context_on_a_shared_system_prompt():
    s = workloads.agentic(random.Random(3), turns=5)
    bodies = [s.first().body]
    while (turn := s.next_turn("the answer")) is not None:
        bodies.append(turn.body)
        assert 0.2 <= turn.think_s <= 1.0
    assert len(bodies) == 5
    assert all(b["messages"][0]["content"] == workloads.SYSTEM_PROMPT for b in bodies)
    assert all(b["tools"] == workloads.TOOLS and b["tool_choice"] == "none" for b in bodies)  # every turn alike
    for prev, nxt in itertools.pairwise(bodies):
        assert nxt["messages"][: len(prev["messages"])] == prev["messages"]  # the prefix is reused


def test_multihop_quotes_the_previous_answer_and_rag_repeats_popular_passages():
    s = workloads.multihop(random.Random(4), hops=3)
    s.first()
    assert "ANSWER-42" in s.next_turn("ANSWER-42").body["messages"][0]["content"]
    corpus = workloads.Corpus()
    rng = random.Random(5)
    drawn = [p for _ in range(200) for p in corpus.draw(rng, 4)]
    assert drawn.count(corpus.passages[0]) > 50  # Zipf: the head passage recurs


@pytest.mark.slow
def test_agentic_locust_users_reuse_the_prefix_and_report_ttft_tpot(tmp_path):
    r = run_infemu(
        "run",
        example("quickstart.yaml"),
        "--workload",
        "agentic",
        "--concurrency",
        "3",
        "--duration",
        "10",
        "--out",
        "rep",
        "--json",
        "--shaping",
        "inproc",
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["completed"] >= 10 and summary["failed"] == 0
    inst = json.loads((tmp_path / "rep" / "instances.json").read_text())["agg-0"]
    assert inst["prefix_cache_hits"] / inst["prefix_cache_queries"] > 0.5  # 5-turn sessions
    with open(tmp_path / "rep" / "locust_stats.csv", newline="") as fh:
        types = {row["Type"] for row in csv.DictReader(fh)}
    assert {"TTFT", "TPOT", "E2E"} <= types


@pytest.mark.slow
def test_open_loop_start_lag_p99_within_10_ms_at_50_requests_per_second(tmp_path):
    from emulator.catalog.models import get_model
    from emulator.client import run_plan
    from emulator.cluster.local import LocalCluster
    from emulator.overrides import WorkloadOverrides, apply_overrides
    from emulator.spec import load_clusters
    from emulator.workload.plan import build_plan

    skip_if_host_lags()  # the gate measures this process's timers: on a busy host it would measure the host
    cluster = apply_overrides(
        load_clusters(example("quickstart.yaml"))[0],
        WorkloadOverrides(rate=50, requests=400, input_len=128, output_len=16),
    )
    lc = LocalCluster(
        example("quickstart.yaml"), cluster.name, run_dir=str(tmp_path / "run"), shaping="inproc", cluster=cluster
    )
    state = lc.start()
    try:
        records, lags = asyncio.run(
            run_plan(state.router, "llama-3.1-8b", build_plan(cluster.spec.workload), get_model("llama-3.1-8b").vocab)
        )
    finally:
        lc.stop()
    assert all(r.ok for r in records)
    assert float(np.percentile(lags, 99)) <= 0.010, np.percentile(lags, [50, 99])


def test_unknown_workload_is_one_line_and_exit_2(tmp_path):
    r = run_infemu("run", example("quickstart.yaml"), "--workload", "poetry", cwd=str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --workload: 'poetry' is unknown")


def test_mmpp_bursts_keep_the_mean_rate_and_are_burstier_than_poisson():
    from emulator.spec import MMPPArrival
    from emulator.workload.plan import mmpp_times

    arr = MMPPArrival(burst_rate=40, idle_rate=2, burst_seconds=2, idle_seconds=6)
    times = mmpp_times(np.random.default_rng(3), arr, None, 4000.0)
    assert len(times) / 4000.0 == pytest.approx(arr.mean_rate, rel=0.05)  # (40*2 + 2*6) / 8 = 11.5 req/s
    assert _cv(np.diff(times)) > 1.5  # Poisson would be 1.0


def test_mmpp_spec_plans_and_simulates():
    from emulator.overrides import WorkloadOverrides, apply_overrides
    from emulator.sim.simulator import simulate
    from emulator.spec import parse_cluster
    from emulator.workload.plan import build_plan

    doc = {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "InferenceCluster",
        "metadata": {"name": "burst"},
        "spec": {
            "model": "llama-3.1-8b",
            "topology": {"gpusPerNode": 1},
            "pools": [{"name": "a"}],
            "workload": {
                "arrival": {"type": "mmpp", "burstRate": 30, "idleRate": 1, "burstSeconds": 3, "idleSeconds": 9},
                "requests": 300,
            },
        },
    }
    cluster = apply_overrides(parse_cluster(doc), WorkloadOverrides(output_len=32))
    plan = build_plan(cluster.spec.workload)
    assert len(plan.requests) == 300
    assert simulate(cluster, plan).summary["completed"] == 300


def test_load_shapes_are_pure_schedules():
    from loadgen.schedules import burst_users, stages_users

    assert [stages_users(t, 8, 40) for t in (0, 11, 21, 31, 40)] == [2, 4, 8, 2, None]
    assert [burst_users(t, 2, 30) for t in (0, 6.9, 7, 9.9, 10, 29)] == [2, 2, 8, 8, 2, 8]


async def test_open_loop_cap_drops_and_counts_instead_of_delaying():
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from emulator.client import run_plan
    from emulator.workload.plan import PlannedRequest, RequestPlan

    async def slow(request):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await asyncio.sleep(0.3)
        await resp.write(b'data: {"choices":[{"text":"x"}]}\n\ndata: [DONE]\n\n')
        return resp

    app = web.Application()
    app.router.add_post("/v1/completions", slow)
    async with TestServer(app) as server:
        plan = RequestPlan(tuple(PlannedRequest(i, 0.01 * i, 8, 1) for i in range(10)))
        records, _ = await run_plan(str(server.make_url("")).rstrip("/"), "m", plan, 1000, max_in_flight=3)
    dropped = [r for r in records if r.error and r.error.startswith("dropped")]
    assert len(dropped) == 7 and sum(r.ok for r in records) == 3


async def test_closed_loop_clients_share_the_connection_pool_and_wait_with_their_clock_running():
    """The live client as the simulator models it (workload.client.maxConnections): 4 clients, 2
    connections: the server never sees more than 2 requests, and the 2 that wait for a connection
    carry the wait in their TTFT (a lower bound of two handler delays: sleeps only lengthen it)."""
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    from emulator.client import run_closed_loop
    from emulator.workload.clients import ClientBehaviour
    from emulator.workload.plan import PlannedRequest, RequestPlan

    open_now, most = [0], [0]

    async def slow(request):
        open_now[0] += 1
        most[0] = max(most[0], open_now[0])
        try:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await asyncio.sleep(0.2)
            await resp.write(b'data: {"choices":[{"text":"x"}]}\n\ndata: [DONE]\n\n')
            return resp
        finally:
            open_now[0] -= 1

    app = web.Application()
    app.router.add_post("/v1/completions", slow)
    plan = RequestPlan(tuple(PlannedRequest(i, 0.0, 8, 1) for i in range(4)), concurrency=4)
    async with TestServer(app) as server:
        url = str(server.make_url("")).rstrip("/")
        records = await run_closed_loop(url, "m", plan, 1000, behaviour=ClientBehaviour(), max_connections=2)
        assert most[0] == 2 and all(r.ok for r in records)
        ttfts = sorted(r.ttft_ms for r in records)
        assert ttfts[2] >= 380 and ttfts[3] >= 380  # waited for a connection, then for the handler
        waits = sorted(r.client_wait_ms for r in records)  # aiohttp's pool hooks measured the wait itself
        assert waits[:2] == [0.0, 0.0] and waits[2] >= 180 and waits[3] >= 180
        most[0] = 0
        records = await run_closed_loop(url, "m", plan, 1000, behaviour=ClientBehaviour())
        assert most[0] == 4 and all(r.ok for r in records)


@pytest.mark.slow
def test_infemu_loadtest_drives_a_running_router_with_locust_master_and_workers(tmp_path):
    """What the LoadTest Job runs: Locust master + 2 forked workers against an existing router;
    the compact summary (the `infemu sim --json` keys) lands in the termination-log file."""
    from emulator.results import SUMMARY_KEYS

    up = run_infemu("up", example("quickstart.yaml"), "--detach", "--json", cwd=str(tmp_path))
    assert up.returncode == 0, up.stderr
    router = json.loads(up.stdout)["router"]
    try:
        term = tmp_path / "termination-log"
        r = run_infemu(
            "loadtest",
            "--target",
            router,
            "--model",
            "llama-3.1-8b",
            "--workload",
            "chat",
            "--users",
            "4",
            "--duration",
            "6",
            "--workers",
            "2",
            "--out",
            str(tmp_path / "lt"),
            "--summary-file",
            str(term),
            cwd=str(tmp_path),
        )
    finally:
        run_infemu("down", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr + (tmp_path / "lt" / "locust.log").read_text()
    summary = json.loads(r.stdout)
    assert set(SUMMARY_KEYS) <= set(summary) and summary["completed"] > 0 and summary["failed"] == 0
    compact = json.loads(term.read_text())
    assert compact["requests"] == summary["requests"] and len(term.read_bytes()) <= 4096
    # both forked workers sent requests (each names its requests by its pid), merged into requests.jsonl
    # with no per-process copy left beside it
    lines = (tmp_path / "lt" / "requests.jsonl").read_text().splitlines()
    assert len({json.loads(line)["request_id"].split("-")[0] for line in lines}) >= 2
    assert not list((tmp_path / "lt").glob("locust-requests.jsonl.*"))
