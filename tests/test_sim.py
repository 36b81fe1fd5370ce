"""The simulator against queueing theory, DistServe's TP/PP crossover, and its own slow path."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import example

from emulator.build import build_instances
from emulator.costmodel.interface import BatchShape
from emulator.overrides import WorkloadOverrides, apply_overrides
from emulator.sim.simulator import Simulation, simulate
from emulator.spec import load_clusters, parse_cluster
from emulator.workload.plan import build_plan

MD1_SPEC = {
    "apiVersion": "infemu.io/v1alpha1",
    "kind": "InferenceCluster",
    "metadata": {"name": "md1"},
    "spec": {
        "model": "llama-3.1-8b",
        "engine": {"name": "ideal"},  # a pure M/D/1 server: no API server queue in front of it
        "gpu": "h100-sxm",
        "topology": {"nodes": 1, "gpusPerNode": 2},
        "pools": [
            {
                "name": "one",
                "tp": 1,
                "maxNumSeqs": 1,
                "chunkedPrefill": False,
                "prefixCaching": False,
                "maxNumBatchedTokens": 1024,
                "maxModelLen": 1024,
            }
        ],
        "workload": {
            "requests": 10,
            "inputLength": {"type": "fixed", "value": 512},
            "outputLength": {"type": "fixed", "value": 1},
            "seed": 11,
        },
    },
}


def _md1_cluster(tp: int):
    doc = {**MD1_SPEC, "spec": {**MD1_SPEC["spec"], "pools": [{**MD1_SPEC["spec"]["pools"][0], "tp": tp}]}}
    return parse_cluster(doc)


def _service_time(cluster) -> float:
    _, setups = build_instances(cluster.spec)
    return setups[0].cost.step_time(BatchShape(prefill_chunks=((512, 0),))).total_s


def _run(cluster, **ov):
    cluster = apply_overrides(cluster, WorkloadOverrides(**ov))
    return simulate(cluster, build_plan(cluster.spec.workload))


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2])
def test_mean_ttft_matches_md1(tp):
    """DistServe §3: M/D/1 at R·D = 0.5; with 2-way intra-op speedup K: D/K + R D² / (2K(K − R D))."""
    d = _service_time(_md1_cluster(1))
    k = d / _service_time(_md1_cluster(2)) if tp == 2 else 1.0
    rate = 0.5 / d
    result = _run(_md1_cluster(tp), rate=rate, requests=30_000)
    expected = d / k + rate * d**2 / (2 * k * (k - rate * d))
    measured = result.summary["ttft_ms"]["mean"] / 1e3
    assert result.summary["completed"] == 30_000
    assert measured == pytest.approx(expected, rel=0.03), (measured, expected, k)
    if tp == 2:
        assert 1.0 < k < 2.0


def _crossover_rates():
    tp, pp = load_clusters(example("tp-vs-pp.yaml"))
    rows = []
    for rate in (5, 10, 20, 30, 40, 45, 50, 55, 60):
        a = _run(tp, rate=rate, requests=3000).summary["ttft_ms"]["mean"]
        b = _run(pp, rate=rate, requests=3000).summary["ttft_ms"]["mean"]
        rows.append((rate, a, b))
    return rows


@pytest.mark.slow
def test_tp_wins_at_low_rate_pp_at_high_rate_and_the_crossover_is_found():
    rows = _crossover_rates()
    assert rows[0][1] < rows[0][2]  # TP=2 lower TTFT at low rate
    assert rows[-1][2] < rows[-1][1]  # PP=2 lower TTFT at high rate
    crossover = next(rate for rate, tp_ttft, pp_ttft in rows if pp_ttft < tp_ttft)
    assert 10 < crossover < 60
    # below the crossover TP always wins, above it PP always wins
    assert all(a < b for r, a, b in rows if r < crossover)
    assert all(b < a for r, a, b in rows if r >= crossover)


def _timelines(result):
    return [
        (r.request_id, r.first_token_s, r.finish_s, r.output_tokens, r.itl_max_ms, r.kv_transfer_s)
        for r in result.records
    ]


@pytest.mark.parametrize("name, requests", [("quickstart.yaml", 300), ("pd-llama70b-h100.yaml", 200)])
def test_bulk_decode_gives_the_same_timelines_as_stepping(name, requests):
    cluster = apply_overrides(load_clusters(example(name))[0], WorkloadOverrides(requests=requests))
    plan = build_plan(cluster.spec.workload)
    fast = simulate(cluster, plan, bulk=True)
    slow = simulate(cluster, plan, bulk=False)
    a, b = _timelines(fast), _timelines(slow)
    # the same events at the same times; a bulk stretch sums its step times in another order, so
    # the last bit of a float may differ (1e-15 s), never more
    assert [(r[0], r[3]) for r in a] == [(r[0], r[3]) for r in b]
    for x, y in zip(a, b, strict=True):
        assert [v is None for v in x] == [v is None for v in y]
        assert [v for v in x[1:] if v is not None] == pytest.approx(
            [v for v in y[1:] if v is not None], rel=1e-9, abs=1e-12
        )
    assert fast.events < slow.events


def _fleet(arrival: dict, policy: str) -> dict:
    """Four aggregated instances behind one router, lengths that vary, so instances are mid-stretch
    whenever a request is routed to another one."""
    return {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "InferenceCluster",
        "metadata": {"name": "fleet"},
        "spec": {
            "model": "llama-3.1-8b",
            "gpu": "h100-sxm",
            "topology": {"nodes": 1, "gpusPerNode": 4},
            "pools": [{"name": "agg", "replicas": 4, "maxModelLen": 4096}],
            "router": {"policy": policy},
            "workload": {
                "arrival": arrival,
                "rate": 24.0,
                "requests": 400,
                "inputLength": {"type": "lognormal", "mean": 600, "sigma": 0.6},
                "outputLength": {"type": "lognormal", "mean": 160, "sigma": 0.8},
            },
        },
    }


@pytest.mark.parametrize(
    "arrival, policy",
    [
        ({"type": "poisson"}, "least_loaded"),
        ({"type": "concurrency", "n": 48}, "least_loaded"),
        ({"type": "poisson"}, "prefix_affinity"),
    ],
)
def test_bulk_decode_of_a_fleet_gives_the_same_timelines_as_stepping(arrival, policy):
    """Each instance decodes in bulk until something reaches it (a request routed to it, a fault): the
    router reading the others' queues mid-stretch, and clients sending on another instance's finish,
    change nothing."""
    cluster = parse_cluster(_fleet(arrival, policy))
    plan = build_plan(cluster.spec.workload)
    fast = simulate(cluster, plan, bulk=True)
    slow = simulate(cluster, plan, bulk=False)
    a, b = _timelines(fast), _timelines(slow)
    assert [(r[0], r[3]) for r in a] == [(r[0], r[3]) for r in b]
    assert [r.instance for r in fast.records] == [r.instance for r in slow.records]
    for x, y in zip(a, b, strict=True):
        assert [v for v in x[1:] if v is not None] == pytest.approx(
            [v for v in y[1:] if v is not None], rel=1e-9, abs=1e-12
        )
    assert fast.events < slow.events / 2
    if policy == "least_loaded":  # the load board chooses as the policy does over fresh snapshots
        sim = Simulation(cluster, plan)
        assert sim.board is not None
        sim.board = None
        plain = sim.run()
        assert [r.instance for r in plain.records] == [r.instance for r in fast.records]


def test_same_seed_same_results_and_other_seed_differs():
    cluster = load_clusters(example("quickstart.yaml"))[0]
    a = _run(cluster, requests=100, seed=5).summary
    b = _run(cluster, requests=100, seed=5).summary
    c = _run(cluster, requests=100, seed=6).summary
    assert a == b and a != c


def test_pd_kv_transfer_follows_the_scale_out_tier():
    cluster = load_clusters(example("pd-llama70b-h100.yaml"))[0]
    result = _run(cluster, requests=40, rate=0.5)  # light load: transfers rarely overlap
    _, setups = build_instances(cluster.spec)
    kv_per_token = setups[0].cost.kv_transfer_bytes(1)
    assert kv_per_token == 2 * 80 * 8 * 128 * 2
    from emulator.catalog.links import get_tier

    ib = get_tier("ib-ndr-400")
    # the prefill side sends over 4 GPUs' NICs, the decode side receives over 8: the sender limits
    solo = [r for r in result.records if r.kv_transfer_s is not None]
    assert len(solo) == 40 and all(r.prefill_instance.startswith("prefill-") for r in result.records)
    expected = np.array([ib.latency_s + r.prompt_tokens * kv_per_token / (4 * ib.bandwidth) for r in solo])
    got = np.array([r.kv_transfer_s for r in solo])
    assert np.median(np.abs(got - expected) / expected) < 0.01


def test_a_pd_clients_first_token_comes_from_the_decode_after_the_pull():
    """As vLLM's P/D proxy and NVIDIA Dynamo serve it, the client's whole stream comes from the decode:
    its TTFT holds the prefill, the KV pull and the decode's first step, and every token is the decode's."""
    cluster = load_clusters(example("pd-llama70b-h100.yaml"))[0]
    result = _run(cluster, requests=40, rate=0.5)  # light load: each request alone
    _, setups = build_instances(cluster.spec)
    prefill = next(s for s in setups if s.instance.role == "prefill")
    decode = next(s for s in setups if s.instance.role == "decode")
    assert all(r.ok for r in result.records)
    one_step = [r for r in result.records if r.prompt_tokens <= 8192]  # prefilled in one step (the budget)
    assert len(one_step) > 30
    for r in one_step:
        prefilled = prefill.cost.step_time(BatchShape(prefill_chunks=((r.prompt_tokens, 0),))).total_s
        first_step = decode.cost.step_time(BatchShape(num_decode=1, decode_kv_sum=r.prompt_tokens)).total_s
        handoff = prefill.cost.profile.api.pd_handoff_s  # the engine's fitted hand-off path (docs/fidelity.md)
        assert r.first_token_s - r.arrival_s > prefilled + handoff + r.kv_transfer_s + first_step
        # the tokens after the first: one decode step each, no hand-off gap among them
        longest = BatchShape(num_decode=1, decode_kv_sum=r.prompt_tokens + r.output_tokens)
        assert r.itl_max_ms < 1.5e3 * decode.cost.step_time(longest).total_s


def test_the_pd_hand_off_is_the_engines_unless_the_spec_sets_it():
    cluster = load_clusters(example("pd-llama70b-h100.yaml"))[0]
    handoff_ms = build_instances(cluster.spec)[1][0].cost.profile.api.pd_handoff_s * 1e3
    assert handoff_ms > 0  # fitted on measured P/D deployments (engine_constants.json)
    doc = cluster.model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["engine"] = {**doc["spec"].get("engine", {}), "pdHandoffMs": 0}
    default = _run(cluster, requests=20, rate=0.5).summary["ttft_ms"]["mean"]
    without = _run(parse_cluster(doc), requests=20, rate=0.5).summary["ttft_ms"]["mean"]
    assert default - without == pytest.approx(handoff_ms, rel=0.1)  # alone, each request pays it once


def test_concurrent_pulls_share_the_link_max_min_fairly():
    from emulator.sim.network import FlowNetwork

    net = FlowNetwork()
    net.set_capacity("p:tx", 100.0)
    net.set_capacity("d1:rx", 100.0)
    net.set_capacity("d2:rx", 30.0)
    net.add("a", 1000, ("p:tx", "d1:rx"), 0.0)
    net.add("b", 1000, ("p:tx", "d2:rx"), 0.0)
    assert net.flows["b"].rate == pytest.approx(30.0)  # bottlenecked at its receiver
    assert net.flows["a"].rate == pytest.approx(70.0)  # takes the rest of the sender


def test_closed_loop_concurrency_never_exceeds_n_in_flight():
    cluster = load_clusters(example("quickstart.yaml"))[0]
    result = _run(cluster, concurrency=4, requests=60)
    events = sorted([(r.arrival_s, 1) for r in result.records] + [(r.finish_s, -1) for r in result.records])
    live = np.cumsum([d for _, d in events])
    assert live.max() <= 4 and result.summary["completed"] == 60


def _lru_prefix_hit_rate(records, capacity_blocks: int) -> float:
    """An independent model: an LRU cache of trace blocks, hits only along a shared prefix."""
    from collections import OrderedDict

    lru: OrderedDict = OrderedDict()
    hit = total = 0
    for r in records:
        prefix: tuple = ()
        on_prefix = True
        for h, n in r.segments:
            prefix = (*prefix, h)
            total += n
            if on_prefix and prefix in lru:
                hit += n
                lru.move_to_end(prefix)
            else:
                on_prefix = False
                lru[prefix] = True
                if len(lru) > capacity_blocks:
                    lru.popitem(last=False)
    return hit / total


def test_mooncake_trace_prefix_hits_match_an_lru_model_of_the_same_capacity(shared_data):
    from emulator.workload.traces import MOONCAKE_BLOCK_TOKENS, read_mooncake

    trace = os.path.join(shared_data, "traces", "mooncake_conversation.jsonl")
    doc = {
        **MD1_SPEC,
        "spec": {
            **MD1_SPEC["spec"],
            "pools": [{"name": "agg", "maxModelLen": 131072}],
            "workload": {
                "arrival": {"type": "trace", "path": trace, "format": "mooncake", "timeScale": 4.0},
                "requests": 2000,
            },
        },
    }
    cluster = parse_cluster(doc)  # a quarter of the trace's rate: the instance keeps up
    result = _run(cluster)
    assert result.summary["completed"] == 2000
    hit = sum(r.cached_tokens for r in result.records) / sum(r.prompt_tokens for r in result.records)
    _, setups = build_instances(cluster.spec)
    capacity = setups[0].engine.num_gpu_blocks * setups[0].engine.block_size // MOONCAKE_BLOCK_TOKENS
    expected = _lru_prefix_hit_rate(read_mooncake(trace)[:2000], capacity)
    assert hit > 0.02 and hit == pytest.approx(expected, abs=0.01)


def test_requests_longer_than_the_context_fail_explicitly():
    cluster = load_clusters(example("tp-vs-pp.yaml"))[0]  # maxModelLen 1024
    result = _run(cluster, requests=5, input_len=2000)
    assert result.summary["failed"] == 5
    assert all("maximum context length is 1024" in r.error for r in result.records)
    assert result.summary["slo_attainment"] == 0.0


def test_a_stream_interval_delivers_tokens_in_bursts_and_leaves_ttft_and_tpot_alone():
    """engine.streamInterval N: the API server sends a stream's first token at once, then every N tokens,
    the rest at the end (vLLM --stream-interval). The first and last tokens keep their times, so TTFT
    and TPOT stay; the client's longest gap between tokens becomes about N steps."""
    from emulator.costmodel.engines import delivered, sending_tokens

    assert sending_tokens(10, 4).tolist() == [0, 4, 8, 9]
    assert sending_tokens(9, 4).tolist() == [0, 4, 8]
    assert sending_tokens(1, 4).tolist() == [0] and sending_tokens(5, 1).tolist() == [0, 1, 2, 3, 4]
    times = np.arange(10, dtype=float)
    assert delivered(times, 4).tolist() == [0, 4, 4, 4, 4, 8, 8, 8, 8, 9]
    assert delivered(times, 1) is times

    doc = load_clusters(example("quickstart.yaml"))[0].model_dump(by_alias=True, exclude_none=True)
    results = {}
    for interval in (1, 8):
        doc["spec"]["engine"] = {**doc["spec"].get("engine", {}), "streamInterval": interval}
        results[interval] = _run(parse_cluster(doc), concurrency=4, requests=24)
    one, eight = ({r.request_id: r for r in results[i].records} for i in (1, 8))
    assert one.keys() == eight.keys() and len(one) == 24
    longer = 0
    for rid, r in one.items():
        assert (eight[rid].first_token_s, eight[rid].finish_s) == (r.first_token_s, r.finish_s)
        # the longest wait between sends spans the longest gap between steps (and up to 7 more steps)
        assert eight[rid].itl_max_ms >= r.itl_max_ms
        step = (r.finish_s - r.first_token_s) / (r.output_tokens - 1)
        longer += eight[rid].itl_max_ms >= r.itl_max_ms + 4 * step * 1e3
    assert longer >= 20
    assert results[8].summary["tpot_ms"] == results[1].summary["tpot_ms"]
