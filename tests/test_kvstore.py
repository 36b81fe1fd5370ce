"""The kvstore role: an LRU store within its capacity, fetch-or-recompute, fetched blocks that the
engine's prefix cache then finds, exact (scaled) bytes, and one store shared by two engines."""

from __future__ import annotations

import math

import pytest
from aiohttp.test_utils import TestClient, TestServer

from emulator.build import build_instances
from emulator.costmodel.interface import BatchShape, StepTime
from emulator.engine.block_pool import BlockPool
from emulator.kvstore.decide import plan_fetch
from emulator.kvstore.store import KVStore
from emulator.sim.simulator import simulate
from emulator.spec import parse_cluster
from emulator.workload.plan import plan_for


def test_the_store_evicts_least_recently_used_blocks_to_stay_within_capacity():
    s = KVStore(capacity_bytes=10 * 100.0, block_bytes=100.0)
    assert s.capacity_blocks == 10
    assert s.put([1, 2, 3, 4, 5, 6, 7, 8]) == 8
    assert s.lookup([1, 2, 99, 4]) == 2  # contiguous from the start only; 1 and 2 are now recent
    assert s.put([9, 10, 11, 12]) == 4
    assert len(s) == 10 and s.used_bytes == 1000.0
    assert s.stats.evicted_blocks == 2 and 3 not in s and 4 not in s  # the least recently used went
    assert s.lookup([5, 6, 7], start=1) == 2
    assert s.missing([1, 3, 12]) == [3]
    assert s.read([1, 2, 3]) == 2 and s.stats.fetched_blocks == 2
    with pytest.raises(ValueError, match="capacityGb"):
        KVStore(capacity_bytes=50.0, block_bytes=100.0)


def test_installed_blocks_are_cached_free_blocks_and_evictions_are_recorded():
    pool = BlockPool(num_blocks=4)
    pool.evicted = []
    assert pool.install([11, 12, 13]) == 3
    assert pool.num_free == 4 and all(pool.lookup(h) is not None for h in (11, 12, 13))
    assert pool.install([11, 14, 15]) == 2  # 11 is held already; 15 takes the block of the LRU hash
    assert pool.evicted == [13]  # the prefix's tail goes first
    assert pool.lookup(11) is not None and pool.lookup(13) is None


class _LinearPrefill:
    """A cost model whose prefill costs 1 us per token, plus 1 us per 1,000 tokens of context each."""

    def step_time(self, shape: BatchShape) -> StepTime:
        t = sum(q * 1e-6 * (1 + (ctx + q) / 1000) for q, ctx in shape.prefill_chunks)
        return StepTime(t, t)


@pytest.mark.parametrize(
    ("rate", "fetch"),
    [(1e12, True), (1e6, False)],
)
def test_fetch_or_recompute_takes_the_cheaper_path(rate, fetch):
    cost = _LinearPrefill()
    plan = plan_fetch(
        cost,
        local_tokens=32,
        store_blocks=100,
        prompt_tokens=1000,
        block_size=16,
        block_bytes=1e5,
        rate=rate,
        latency_s=1e-5,
    )
    usable = (1000 - 1) // 16 - 2  # the last token is always computed; 2 blocks are local already
    assert plan.fetch_s == pytest.approx(1e-5 + usable * 1e5 / rate)
    saved = usable * 16
    with_all = cost.step_time(BatchShape(prefill_chunks=((1000 - 32, 32),))).total_s
    rest = cost.step_time(BatchShape(prefill_chunks=((1000 - 32 - saved, 32 + saved),))).total_s
    assert plan.recompute_s == pytest.approx(with_all - rest)
    assert plan.fetch is fetch and (plan.blocks == usable if fetch else plan.blocks == 0)
    nothing = plan_fetch(
        cost, local_tokens=0, store_blocks=0, prompt_tokens=1000, block_size=16, block_bytes=1e5, rate=rate, latency_s=0
    )
    assert not nothing.fetch


def shared_store_spec(tier: str = "ib-ndr-400", requests: int = 2, capacity_gb: float = 64, prompt: int = 4096):
    return {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "InferenceCluster",
        "metadata": {"name": "shared-store"},
        "spec": {
            "model": {"name": "llama-3.1-8b"},
            "gpu": "h100-sxm",
            "topology": {"nodes": 1, "gpusPerNode": 8, "scaleOut": {"tier": tier}},
            "pools": [
                {"name": "store", "role": "kvstore", "kvstore": {"capacityGb": capacity_gb}},
                {"name": "llm", "role": "aggregated", "replicas": 2},
            ],
            "router": {"policy": "round_robin"},
            "workload": {
                "arrival": {"type": "constant"},
                "rate": 1,
                "requests": requests,
                "inputLength": prompt,
                "outputLength": 8,
                "client": {"promptPool": 1},  # every request sends the same long prompt
            },
        },
    }


def test_a_store_shared_by_two_engines_turns_a_repeated_prefix_on_the_second_into_a_fetch():
    cluster = parse_cluster(shared_store_spec())
    res = simulate(cluster, plan_for(cluster))
    first, second = res.records
    assert (first.instance, second.instance) == ("llm-0", "llm-1")  # round robin: the second engine never saw it
    assert first.kv_fetched_tokens == 0
    blocks = (4096 - 1) // 16
    assert second.kv_fetched_tokens == blocks * 16 and second.cached_tokens == blocks * 16
    store = res.instances["store-0"]
    _, setups = build_instances(cluster.spec)
    block_bytes = setups[0].cost.kv_transfer_bytes(16)
    assert store["bytes_fetched"] == blocks * block_bytes  # exactly the fetched blocks' bytes
    assert store["bytes_written"] == (4096 // 16) * block_bytes  # the first prefill's full blocks, once
    tier_bw, latency = 50e9, 15e-6  # ib-ndr-400 per GPU endpoint (catalog/links.py); the engine has one GPU
    assert second.kv_fetch_s == pytest.approx(latency + blocks * block_bytes / tier_bw)
    doc = shared_store_spec()
    doc["spec"]["pools"] = doc["spec"]["pools"][1:]
    plain = simulate(parse_cluster(doc), plan_for(parse_cluster(doc)))
    assert second.ttft_ms < 0.5 * plain.records[1].ttft_ms  # fetching 4k tokens beats computing them


def test_a_pd_prefill_writes_its_prompt_to_the_store_for_the_other_prefill_instance():
    """In P/D the prefill instances are the store's writers: the simulator once skipped a P/D prefill's
    write-through with its first token (which stays on the prefill instance), so examples/rag.yaml's
    store held nothing and never served a block, while the emulated workers wrote theirs."""
    doc = shared_store_spec()
    store = doc["spec"]["pools"][0]
    doc["spec"]["pools"] = [
        store,
        {"name": "prefill", "role": "prefill", "replicas": 2},
        {"name": "decode", "role": "decode", "replicas": 1},
    ]
    doc["spec"]["router"] = {"policy": "pd"}
    cluster = parse_cluster(doc)
    res = simulate(cluster, plan_for(cluster))
    first, second = res.records
    assert (first.prefill_instance, second.prefill_instance) == ("prefill-0", "prefill-1")
    blocks = (4096 - 1) // 16
    assert first.kv_fetched_tokens == 0 and second.kv_fetched_tokens == blocks * 16
    assert res.instances["store-0"]["put_blocks"] == 4096 // 16  # the first prefill's full blocks, once


def test_a_slow_store_tier_makes_the_engine_recompute():
    cluster = parse_cluster(shared_store_spec(tier="ethernet-10"))
    res = simulate(cluster, plan_for(cluster))
    assert res.records[1].kv_fetched_tokens == 0  # 535 MB over 1.25 GB/s loses to a ~0.3 s prefill
    assert res.instances["store-0"]["hit_blocks"] > 0 and res.instances["store-0"]["bytes_fetched"] == 0


def test_eviction_keeps_the_store_within_its_capacity():
    doc = shared_store_spec(requests=40, capacity_gb=1.0, prompt=2048)
    doc["spec"]["workload"]["client"] = {"promptPool": 100_000}  # distinct prompts: 40 x 268 MB into 1 GB
    doc["spec"]["workload"]["rate"] = 20
    cluster = parse_cluster(doc)
    store = simulate(cluster, plan_for(cluster)).instances["store-0"]
    assert store["evicted_blocks"] > 0 and store["used_bytes"] <= store["capacity_bytes"] <= 1e9


# ---- the store service ----------------------------------------------------------------------------


async def test_the_store_service_moves_exactly_the_scaled_bytes_and_serves_only_the_cluster(monkeypatch):
    from emulator.serve.afd_exchange import make_links
    from emulator.serve.internal import INTERNAL_TOKEN_HEADER, TOKEN_ENV
    from emulator.serve.kvstore_app import create_kvstore_app, store_block_bytes
    from emulator.topology import place

    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    cluster = parse_cluster(shared_store_spec())
    topo = place(cluster.spec)
    app = create_kvstore_app(cluster, topo.by_name("store-0"), topo)
    auth = {INTERNAL_TOKEN_HEADER: "s3cret"}
    block_bytes, _ = store_block_bytes(cluster.spec)
    async with TestClient(TestServer(app)) as client:
        assert (await client.post("/internal/kvstore/lookup", json={"hashes": [1]})).status == 403
        assert (await client.post("/internal/kvstore/lookup", json={"hashes": [-1]}, headers=auth)).status == 400
        assert (await client.post("/internal/kvstore/lookup", json=[1], headers=auth)).status == 400
        r = await (await client.post("/internal/kvstore/reserve", json={"hashes": [1, 2, 3]}, headers=auth)).json()
        assert r["missing"] == [1, 2, 3] and r["block_bytes"] == block_bytes
        w = await client.post(f"/internal/kvstore/write/{r['ticket']}", data=b"\0" * 1000, headers=auth)
        assert w.status == 200
        assert (await client.post(f"/internal/kvstore/write/{r['ticket']}", data=b"", headers=auth)).status == 404
        got = await (await client.post("/internal/kvstore/lookup", json={"hashes": [1, 2, 9, 3]}, headers=auth)).json()
        assert got["blocks"] == 2
        f = await client.post("/internal/kvstore/fetch", json={"hashes": [1, 2, 3, 4], "to": "llm-1"}, headers=auth)
        body = await f.read()
        _, scales = make_links(cluster.spec, topo, topo.by_name("store-0"), "inproc")
        assert f.headers["X-Infemu-Blocks"] == "3"  # 4 was never written
        assert float(f.headers["X-Infemu-Logical-Bytes"]) == 3 * block_bytes
        assert len(body) == math.ceil(3 * block_bytes / scales[topo.scale_out.name])  # the store's byte scale S
        metrics = await (await client.get("/metrics")).text()
        assert 'infemu_kvstore_fetched_blocks_total{instance="store-0",model_name="llama-3.1-8b"} 3.0' in metrics


@pytest.mark.slow
def test_real_processes_fetch_a_repeated_prefix_from_the_store_with_exactly_its_bytes(tmp_path):
    import json

    import yaml
    from conftest import run_infemu

    doc = shared_store_spec(requests=3)
    (tmp_path / "store.yaml").write_text(yaml.safe_dump(doc))
    r = run_infemu("run", "store.yaml", "--out", "rep", "--json", "--shaping", "inproc", cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["failed"] == 0
    inst = json.loads((tmp_path / "rep" / "instances.json").read_text())
    blocks = (4096 - 1) // 16
    _, setups = build_instances(parse_cluster(doc).spec)
    block_bytes = setups[0].cost.kv_transfer_bytes(16)
    # the run's summary reports the store in the simulator's keys
    assert summary["kvstore"]["bytes_fetched"] == blocks * block_bytes and summary["kv_fetched_tokens"] == blocks * 16
    assert summary["kvstore"]["bytes_written"] == (4096 // 16) * block_bytes
    # round robin: two requests on one engine (the second a local prefix hit), one on the other, from the store
    fetched = sorted(inst[n]["kvstore_fetched_tokens"] for n in ("llm-0", "llm-1"))
    assert fetched == [0, blocks * 16]
    assert inst["store-0"]["fetched_blocks"] == blocks
    assert inst["store-0"]["blocks"] == 4096 // 16  # the first prefill's full blocks, written once
    assert inst["llm-0"]["kvstore_written_blocks"] + inst["llm-1"]["kvstore_written_blocks"] == 4096 // 16
