"""Attention-FFN disaggregation: the ping-pong schedule, the AFD step, its spec and its simulation;
the role registry every driver asks."""

from __future__ import annotations

import random

import numpy as np
import pytest

from emulator.build import build_instances
from emulator.costmodel.afd import pingpong_s, split_micro_batches
from emulator.costmodel.interface import BatchShape
from emulator.errors import SpecError
from emulator.roles import front_roles, get_role, role_problems, roles
from emulator.spec import InferenceCluster, parse_cluster, validate_document
from emulator.validation import cross_field_problems


def afd_spec(micro_batches: int = 2, **over) -> dict:
    attention = {"name": "attn", "role": "attention", "replicas": 1, "tp": 1, "dp": 2}
    attention["afd"] = {"ffnPool": "experts", "microBatches": micro_batches}
    ffn = {"name": "experts", "role": "ffn", "replicas": 2, "tp": 1}
    attention.update(over.pop("attention", {}))
    ffn.update(over.pop("ffn", {}))
    spec = {
        "model": {"name": "Qwen/Qwen3-30B-A3B"},
        "gpu": "h100-sxm",
        "topology": {"nodes": 1, "gpusPerNode": 8},
        "pools": [attention, ffn],
        "workload": {"arrival": {"type": "poisson"}, "rate": 4, "requests": 60, "seed": 3},
    }
    spec.update(over)
    return {"apiVersion": "infemu.io/v1alpha1", "kind": "InferenceCluster", "metadata": {"name": "afd"}, "spec": spec}


def reference_pingpong(attn, send, ffn, back, layers, dense, tail) -> float:
    """The list schedule written out layer by layer, without the periodic shortcut."""
    a = u = f = d = 0.0
    ready = []
    for x in dense:
        a += x
        ready.append(a)
    for _ in range(layers):
        for i in range(len(attn)):
            a = max(a, ready[i]) + attn[i]
            u = max(u, a) + send[i]
            f = max(f, u) + ffn[i]
            d = max(d, f) + back[i]
            ready[i] = d
    for i in range(len(attn)):
        a = max(a, ready[i]) + tail[i]
    return a


# ---- the schedule, hand-worked ------------------------------------------------------------------


def test_one_micro_batch_is_the_plain_sum():
    # dense 2, then 3 MoE layers of attention 1 + send 0.5 + experts 2 + back 0.5, then tail 0.25
    assert pingpong_s([1.0], [0.5], [2.0], [0.5], 3, dense=[2.0], tail=[0.25]) == pytest.approx(2 + 3 * 4 + 0.25)


def test_two_micro_batches_compute_bound_hide_the_exchange():
    # attention 3 per micro-batch dominates: the attention side never waits after the first layer, and only
    # the last micro-batch's send + experts + return (0.5 + 1 + 0.5) stick out: 2 layers x 2 x 3 + 2 = 14
    assert pingpong_s([3.0, 3.0], [0.5, 0.5], [1.0, 1.0], [0.5, 0.5], 2) == pytest.approx(14.0)


def test_two_micro_batches_comm_bound_wait_for_the_wire():
    # sends of 3 dominate: worked by hand layer by layer (mb1 returns at 8, mb2 at 11; layer 2 at 16 and 19)
    assert pingpong_s([1.0, 1.0], [3.0, 3.0], [1.0, 1.0], [3.0, 3.0], 2) == pytest.approx(19.0)
    # the same work unsplit (one micro-batch of twice the size): 2 x (2 + 6 + 2 + 6) = 32
    assert pingpong_s([2.0], [6.0], [2.0], [6.0], 2) == pytest.approx(32.0)


def test_three_micro_batches_pipeline_through_four_resources():
    # equal stages of 1: the first layer takes (m - 1) + 4 = 6; each later layer adds the round trip of 4
    assert pingpong_s([1.0] * 3, [1.0] * 3, [1.0] * 3, [1.0] * 3, 1) == pytest.approx(6.0)
    assert pingpong_s([1.0] * 3, [1.0] * 3, [1.0] * 3, [1.0] * 3, 3) == pytest.approx(14.0)


def test_periodic_shortcut_equals_the_full_schedule():
    rng = random.Random(7)
    for _ in range(300):
        m = rng.randint(1, 4)
        layers = rng.randint(1, 64)
        parts = [[rng.choice([rng.uniform(0, 3), 1.0]) for _ in range(m)] for _ in range(6)]
        got = pingpong_s(*parts[:4], layers, dense=parts[4], tail=parts[5])
        assert got == pytest.approx(reference_pingpong(*parts[:4], layers, parts[4], parts[5]), rel=1e-12, abs=1e-12)
    # arrays over steps (the decode fast path) give each step's own schedule
    arr = np.array([1.0, 3.0])
    got = pingpong_s([arr, arr], [0.5, 0.5], [1.0, 1.0], [0.5, 0.5], 5)
    for j, a in enumerate(arr):
        assert got[j] == pytest.approx(
            reference_pingpong([a, a], [0.5, 0.5], [1.0, 1.0], [0.5, 0.5], 5, [0, 0], [0, 0])
        )


def test_micro_batches_split_tokens_evenly():
    parts = split_micro_batches(BatchShape(((500, 0), (100, 50)), num_decode=9, decode_kv_sum=9000), 2)
    assert [p.num_decode for p in parts] == [5, 4]
    assert [p.num_tokens for p in parts] == [105, 504]  # the big chunk to the lighter micro-batch
    assert sum(p.decode_kv_sum for p in parts) == 9000
    assert len(split_micro_batches(BatchShape(num_decode=1, decode_kv_sum=10), 3)) == 1  # empty ones dropped


# ---- the AFD step of a built group ----------------------------------------------------------------


def afd_kernels(micro_batches: int = 1, **over):
    spec = parse_cluster(afd_spec(micro_batches, **over)).spec
    _, setups = build_instances(spec)
    (setup,) = setups
    return setup.cost.kernels


def test_afd_step_with_one_micro_batch_is_attention_plus_exchange_plus_experts():
    k = afd_kernels(1)
    shape = BatchShape(num_decode=64, decode_kv_sum=64 * 2000)
    (mb,) = k._sides(shape, np.array([2000.0]), None)
    layers = k.cfg.model.moe_layers
    expected = float(mb.dense[0]) + layers * (float(mb.attn[0]) + 2 * mb.link + mb.ffn) + float(mb.tail)
    assert k.totals(shape, np.array([2000.0]))[0][0] == pytest.approx(expected, rel=1e-12)
    terms = k.terms(shape)
    assert terms["step_s"] == pytest.approx(expected, rel=1e-12)
    assert 0 < terms["ffn_idle"] < 1 and 0 < terms["attention_idle"] < 1


def test_exchange_bytes_follow_the_models_arithmetic():
    k = afd_kernels(1)
    m = k.cfg.model
    # Qwen3-30B-A3B: hidden 2048, top-8 of 128 experts over y = 2 FFN instances: each token goes to both
    assert (m.hidden, m.top_k, m.num_experts) == (2048, 8, 128)
    assert k.fanout == 2
    assert k.exchange_bytes(64) == 64 * 2048 * 2 * 2
    terms = k.terms(BatchShape(num_decode=64, decode_kv_sum=64 * 2000))
    assert terms["exchange_bytes_each_way"] == pytest.approx(m.moe_layers * 64 * 2048 * 2 * 2)
    # the link time is latency + the busiest side's bytes over its ports (an attention rank: 32 tokens)
    tier = k.afd.tier
    rank = 32 * 2048 * 2 * 2 / (1 * tier.bandwidth)
    ffn = 64 * 2048 * 2 * 2 / 2 / (1 * tier.bandwidth)
    assert k._link_s(64, 32) == pytest.approx(tier.latency_s + max(rank, ffn))


def test_micro_batches_pay_off_only_when_the_exchange_dominates():
    shape = BatchShape(num_decode=256, decode_kv_sum=256 * 4000)
    kv = np.array([4000.0])
    # attention and FFN on different nodes (the FFN pool across a slow scale-out tier): the exchange dominates
    slow = {"topology": {"nodes": 2, "gpusPerNode": 2, "scaleOut": {"tier": "ethernet-25"}}}
    one, two = afd_kernels(1, **slow), afd_kernels(2, **slow)
    assert two.totals(shape, kv)[0][0] < 0.85 * one.totals(shape, kv)[0][0]
    # inside one NVLink domain a small decode batch already wakes every expert: each micro-batch re-reads
    # the expert weights, so splitting 64 sequences costs more than the exchange it hides
    small = BatchShape(num_decode=64, decode_kv_sum=64 * 4000)
    one, two = afd_kernels(1), afd_kernels(2)
    assert two.totals(small, kv)[0][0] > one.totals(small, kv)[0][0]


def test_afd_decode_stretch_reproduces_single_steps():
    cost = build_instances(parse_cluster(afd_spec(2)).spec)[1][0].cost
    stretch = cost.decode_stretch_s(40, 40 * 1500, 30)
    singles = [cost.step_time(BatchShape(num_decode=40, decode_kv_sum=40 * 1500 + j * 40)).total_s for j in range(30)]
    assert np.allclose(stretch, singles, rtol=1e-12, atol=0)


# ---- spec, validation, simulation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"attention": {"afd": None}}, "spec.pools[0].afd: an attention pool needs afd.ffnPool"),
        ({"attention": {"afd": {"ffnPool": "nope"}}}, "spec.pools[0].afd.ffnPool: 'nope' is not a pool with role ffn"),
        ({"model": {"name": "llama-3.1-8b"}}, "is dense"),
        ({"ffn": {"replicas": 3}, "attention": {"replicas": 2}}, "must share the 3 instances"),
        ({"ffn": {"replicas": 2, "tp": 2, "ep": 2}, "attention": {"ep": 2}}, "spec.pools[0].ep: 2: the experts live"),
        ({"model": {"name": "deepseek-ai/DeepSeek-V3"}}, "spec.pools[1]: experts need 3"),  # 656 GB over 2 GPUs
    ],
)
def test_afd_specs_are_checked_with_field_paths(over, message):
    with pytest.raises(SpecError) as err:
        parse_cluster(afd_spec(**over))
    assert any(message in p for p in err.value.problems), err.value.problems


def test_an_ffn_pool_must_serve_an_attention_pool():
    doc = afd_spec()
    doc["spec"]["pools"].append({"name": "spare", "role": "ffn", "replicas": 1})
    with pytest.raises(SpecError) as err:
        parse_cluster(doc)
    assert "spec.pools[2]: ffn pool 'spare' serves no attention pool" in str(err.value)


def test_afd_group_simulates_and_every_request_completes():
    from emulator.sim.simulator import simulate
    from emulator.workload.plan import plan_for

    cluster = parse_cluster(afd_spec(2))
    assert cross_field_problems(cluster) == []
    result = simulate(cluster, plan_for(cluster))
    assert result.summary["completed"] == 60 and result.summary["failed"] == 0


def test_pd_with_an_afd_decode_side_simulates():
    from emulator.sim.simulator import simulate
    from emulator.workload.plan import plan_for

    doc = afd_spec()
    doc["spec"]["pools"] = [
        {"name": "prefill", "role": "prefill", "replicas": 1, "tp": 2},
        {"name": "decode", "role": "decode", "replicas": 1, "tp": 1, "dp": 2, "afd": {"ffnPool": "experts"}},
        {"name": "experts", "role": "ffn", "replicas": 2, "tp": 1},
    ]
    cluster = parse_cluster(doc)
    assert cross_field_problems(cluster) == []
    result = simulate(cluster, plan_for(cluster))
    assert result.summary["completed"] == 60 and result.summary["failed"] == 0


# ---- the role registry -----------------------------------------------------------------------------------


def test_every_spec_role_has_one_registry_entry():
    from typing import get_args

    from emulator.spec import Role

    assert set(get_args(Role)) == set(roles())
    assert set(front_roles()) == {"aggregated", "prefill", "attention"}
    assert get_role("prefill").kv_producer and get_role("decode").kv_consumer
    assert not get_role("ffn").engine and get_role("ffn").member
    with pytest.raises(KeyError, match="unknown role"):
        get_role("router")


def test_roles_not_available_yet_are_refused_by_name(monkeypatch):
    import dataclasses

    from emulator.roles import roles

    registry = roles()
    monkeypatch.setitem(registry, "rag", dataclasses.replace(registry["rag"], unavailable="is not available here"))
    doc = afd_spec()
    doc["spec"]["pools"].append({"name": "retriever", "role": "rag", "replicas": 1})
    problems = role_problems(validate_document(InferenceCluster, doc, "").spec)
    assert any(p.startswith("spec.pools[2].role: 'rag' is not available here") for p in problems), problems


async def test_an_afd_worker_serves_and_reports_each_sides_busy_time_and_exchange_bytes():
    from aiohttp.test_utils import TestClient, TestServer
    from prometheus_client.parser import text_string_to_metric_families

    from emulator.serve.app import WorkerSettings, create_app

    cluster = parse_cluster(afd_spec(2))
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "attn-0")))) as c:
        body = {"model": "Qwen/Qwen3-30B-A3B", "prompt": "hello " * 64, "max_tokens": 4, "ignore_eos": True}
        resp = await c.post("/v1/completions", json=body)
        assert resp.status == 200, await resp.text()
        usage = (await resp.json())["usage"]
        assert usage["completion_tokens"] == 4
        text = await (await c.get("/metrics")).text()
    samples = {
        (s.name, s.labels.get("side"), s.labels.get("direction")): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    step = samples[("infemu_afd_step_seconds_total", None, None)]
    attention = samples[("infemu_afd_busy_seconds_total", "attention", None)]
    ffn = samples[("infemu_afd_busy_seconds_total", "ffn", None)]
    assert 0 < attention <= step and 0 < ffn <= step
    sent = samples[("infemu_link_bytes_total", None, "afd_send")]
    # four steps: the prompt's prefill, then three decodes of one sequence, each padded to one token per
    # attention rank (2: every rank replays its CUDA graph); each MoE layer sends every token's BF16 hidden
    # state (2048 x 2 bytes) to both FFN GPUs
    layers = build_instances(cluster.spec)[1][0].cost.kernels.cfg.model.moe_layers
    assert sent == pytest.approx(layers * (usage["prompt_tokens"] + 3 * 2) * 2048 * 2 * 2)


@pytest.mark.slow
def test_attention_and_ffn_processes_exchange_the_modelled_activation_bytes(tmp_path):
    """`infemu run` of the laptop AFD example: the FFN instance runs as its own process, and every byte
    the attention engine's steps send it (logical, byte-scaled on the wire) arrives there."""
    import json

    from conftest import example, run_infemu

    r = run_infemu(
        "run",
        example("moe-qwen3-30b-afd.yaml"),
        "--requests",
        "12",
        "--rate",
        "6",
        "--out",
        "rep",
        "--json",
        "--shaping",
        "inproc",
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["completed"] == 12
    instances = json.loads((tmp_path / "rep" / "instances.json").read_text())
    attn, experts = instances["attn-0"], instances["experts-0"]
    assert experts["role"] == "ffn" and experts["afd_exchanges"] > 12
    assert attn.get("afd_exchange_failures", 0) == 0
    assert experts["afd_rx_bytes"] == pytest.approx(attn["afd_tx_bytes"], rel=1e-9) and attn["afd_tx_bytes"] > 1e8


def test_faults_on_the_expert_side_are_refused_not_ignored():
    doc = afd_spec()
    doc["spec"]["faults"] = [{"name": "k", "kind": "kill", "atSeconds": 1, "target": {"instance": "experts-0"}}]
    with pytest.raises(SpecError) as err:
        parse_cluster(doc)
    assert "spec.faults[0]: experts-0 run no engine (role ffn)" in str(err.value)
    doc["spec"]["faults"] = [{"name": "k", "kind": "kill", "atSeconds": 1, "target": {"instance": "attn-0"}}]
    assert parse_cluster(doc).spec.faults[0].target.instance == "attn-0"
