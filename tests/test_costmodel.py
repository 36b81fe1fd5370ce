"""Cost model: physics sanity, held-out accuracy against the profiled tables, driver parity."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
from conftest import example, example_files

from emulator.catalog.gpus import get_gpu
from emulator.catalog.models import get_model
from emulator.costmodel.accuracy import held_out_attention, held_out_gemm
from emulator.costmodel.instance import InstanceConfig, InstanceCostModel
from emulator.costmodel.interface import BatchShape
from emulator.roles import get_role

H100 = "profiles/aiconfigurator/h100_sxm"


def cost(model="llama-3.1-8b", gpu="h100-sxm", **kw) -> InstanceCostModel:
    return InstanceCostModel(InstanceConfig(get_model(model), get_gpu(gpu), **kw))


def test_decode_step_is_bounded_below_by_reading_the_weights():
    cm = cost()
    m, g = get_model("llama-3.1-8b"), get_gpu("h100-sxm")
    bound = m.weight_bytes("bf16") / g.hbm_bw  # ≈ 4.8 ms
    assert 4.7e-3 < bound < 4.9e-3
    step = cm.step_time(BatchShape(num_decode=1, decode_kv_sum=512)).total_s
    assert bound <= step <= 1.4 * bound


def test_kv_bytes_per_token_formulas():
    assert get_model("llama-3.1-8b").kv_bytes_per_token("bf16") == 2 * 32 * 8 * 128 * 2
    assert get_model("llama-3.1-70b").kv_bytes_per_token("fp8") == 2 * 80 * 8 * 128 * 1
    assert get_model("deepseek-v3").kv_bytes_per_token("bf16") == 61 * (512 + 64) * 2  # MLA latent + rope


def test_parameter_counts_match_published_sizes():
    for name, billions in [
        ("llama-3.1-8b", 8.03),
        ("llama-3.1-70b", 70.6),
        ("llama-3.1-405b", 405.9),
        ("qwen3-30b-a3b", 30.5),
        ("qwen3-235b-a22b", 235.1),
        ("deepseek-v3", 671.0),
        ("mixtral-8x22b", 140.6),
        ("qwen3-32b", 32.8),
    ]:
        assert get_model(name).total_params() / 1e9 == pytest.approx(billions, rel=0.01), name
    assert get_model("deepseek-v3").active_params() / 1e9 == pytest.approx(37.5, rel=0.02)


def test_tensor_parallel_speeds_up_prefill_sublinearly():
    shape = BatchShape(prefill_chunks=((2048, 0),))
    d1 = cost().step_time(shape).total_s
    d2 = cost(tp=2).step_time(shape).total_s
    assert 1.2 < d1 / d2 < 2.0


def test_pipeline_parallel_overlaps_micro_batches():
    st = cost(pp=2).step_time(BatchShape(prefill_chunks=((1024, 0),)))
    assert st.interval_s < 0.6 * st.total_s


def test_prefill_attention_grows_with_cached_context():
    cm = cost()
    fresh = cm.breakdown(BatchShape(prefill_chunks=((512, 0),)))["attention_prefill"]
    long_ctx = cm.breakdown(BatchShape(prefill_chunks=((512, 8192),)))["attention_prefill"]
    assert long_ctx > 3 * fresh


def test_every_catalog_model_has_a_finite_positive_step_on_every_gpu():
    for model, tp, ep in [("qwen3-30b-a3b", 2, 2), ("deepseek-v3", 8, 8), ("mixtral-8x22b", 8, 1), ("qwen3-32b", 2, 1)]:
        for gpu in ("a100-sxm-80g", "h100-sxm", "h200-sxm", "b200"):
            cm = cost(model, gpu, tp=tp, ep=ep)
            for shape in (BatchShape(num_decode=64, decode_kv_sum=64 * 2000), BatchShape(prefill_chunks=((4096, 0),))):
                t = cm.step_time(shape).total_s
                assert 0 < t < 10 and np.isfinite(t), (model, gpu)


def test_roofline_fallback_without_tables():
    with_t = cost().step_time(BatchShape(num_decode=8, decode_kv_sum=8 * 1024)).total_s
    without = cost(use_tables=False).step_time(BatchShape(num_decode=8, decode_kv_sum=8 * 1024)).total_s
    assert without == pytest.approx(with_t, rel=0.35)  # same physics, no profile


def test_decode_stretch_reproduces_single_steps_exactly():
    cm = cost(tp=2)
    shapes = [BatchShape(num_decode=13, decode_kv_sum=13 * 700 + 13 * j) for j in range(50)]
    stretch = cm.decode_stretch_s(13, 13 * 700, 50)
    assert [cm.step_time(s).total_s for s in shapes] == list(stretch)


def test_held_out_gemm_rows_predicted_within_5_percent(shared_data):
    err = held_out_gemm(os.path.join(shared_data, H100), "bfloat16")
    assert err.rows > 5000 and err.median <= 0.05, err


@pytest.mark.parametrize("table", ["attn_ctx", "attn_gen"])
def test_held_out_attention_rows_predicted_within_5_percent(shared_data, table):
    err = held_out_attention(os.path.join(shared_data, H100), table)
    assert err.rows > 3000 and err.median <= 0.05, err


def test_skewed_routing_wakes_fewer_experts_and_loads_the_busiest_rank_more():
    from emulator.costmodel.linear import busiest_rank_load, routing_probabilities

    for routing in ("balanced", "power_law_1.01", "power_law_1.2"):
        p = routing_probabilities(128, routing)
        assert p.sum() == pytest.approx(1.0) and np.all(np.diff(p) <= 1e-15)
    tokens = np.array([1.0, 8.0, 32.0, 4096.0])
    touched_b, pairs_b = busiest_rank_load(tokens, 4, 128, 1, "balanced")
    touched_p, pairs_p = busiest_rank_load(tokens, 4, 128, 1, "power_law_1.01")
    # balanced: a batch of b tokens x top-4 wakes min(128, 4b) experts (aiconfigurator's balanced profiles)
    assert np.allclose(touched_b, [4, 32, 128, 128])
    # independent skewed draws collide: fewer distinct experts for the small batches, all of them for large
    assert np.all(touched_p[:3] < touched_b[:3]) and touched_p[3] == pytest.approx(128, rel=1e-3)
    assert np.allclose(pairs_p, pairs_b)  # one rank holds every expert: the same work either way
    # over 8 expert-parallel ranks the rank holding the most popular expert computes more than 1/8
    _, busiest = busiest_rank_load(4096.0, 4, 128, 8, "power_law_1.01")
    _, even = busiest_rank_load(4096.0, 4, 128, 8, "balanced")
    assert busiest > 1.5 * even
    with pytest.raises(ValueError, match="unknown expert routing"):
        routing_probabilities(8, "zipf")
    # the spec offers exactly the routings the cost model knows
    from typing import get_args

    from emulator.costmodel.linear import ROUTINGS
    from emulator.spec import PoolSpec

    assert set(get_args(PoolSpec.model_fields["expert_routing"].annotation)) == set(ROUTINGS)


def test_moe_kernel_time_follows_the_routing_in_tables_and_roofline():
    """gpt-oss-120b on one H200: a 32-token decode batch under aiconfigurator's default power-law routing
    reads ~45% fewer expert weights than under balanced routing (its profiled tables), and the
    roofline without tables moves the same way."""
    model = get_model("openai/gpt-oss-120b")
    for use_tables in (True, False):
        costs = {}
        for routing in ("balanced", "power_law_1.01"):
            cm = cost("openai/gpt-oss-120b", "h200-sxm", moe_distribution=routing, use_tables=use_tables)
            costs[routing] = cm.breakdown(BatchShape(num_decode=32, decode_kv_sum=32 * 2048))["moe_experts"]
            assert routing in cm.sources["moe_experts"]
        assert costs["power_law_1.01"] < 0.8 * costs["balanced"], (use_tables, costs)
    assert model.num_experts == 128 and model.top_k == 4


def test_wide_ep_dispatch_and_combine_move_the_bytes_the_model_implies():
    """DeepSeek-V3 (hidden 7168, top-8 of 256 experts, FP8 checkpoint) over 8 attention-DP ranks: each
    token's hidden state goes to the other GPUs holding its experts, FP8 out and BF16 back."""
    cm = cost("deepseek-ai/DeepSeek-V3", "h200-sxm", dp=8)
    m = cm.cfg.model
    assert (m.hidden, m.top_k, m.num_experts, cm.quant.moe) == (7168, 8, 256, "fp8_block")
    remote = 8 * (1 - (7 / 8) ** 8) * 7 / 8  # expected distinct other GPUs of 8 holding a token's 8 experts
    assert cm.ep_bytes_per_token("dispatch") == pytest.approx(remote * 7168 * 1)
    assert cm.ep_bytes_per_token("combine") == pytest.approx(remote * 7168 * 2)
    shape = BatchShape(num_decode=256, decode_kv_sum=256 * 2048)
    line, _ = cm.collectives.all_to_all(8)
    per_gpu = 256 / 8
    want = m.moe_layers * (line.scalar(per_gpu * remote * 7168) + line.scalar(per_gpu * remote * 7168 * 2))
    assert cm.breakdown(shape)["ep_dispatch_combine"] == pytest.approx(want, rel=1e-9)
    assert "all-to-all" in cm.sources["ep_dispatch_combine"]


@pytest.mark.parametrize(
    "model,gpu,kw",
    [
        ("llama-3.1-8b", "h100-sxm", {}),
        ("llama-3.1-70b", "h100-sxm", {"tp": 4}),
        ("qwen3-30b-a3b", "h200-sxm", {"tp": 2}),
        ("deepseek-v3", "h200-sxm", {"tp": 8}),
    ],
)
def test_a_step_costs_the_sum_of_its_operators(model, gpu, kw):
    """The step time (one memoised sum for everything outside attention) equals the per-operator
    breakdown that `infemu cost` prints, for prefill, decode, mixed and CUDA-graph-padded steps."""
    cm = cost(model, gpu, **kw)
    shapes = [
        (BatchShape(prefill_chunks=((2048, 0),)), None),
        (BatchShape(num_decode=37, decode_kv_sum=37 * 3000), 40),
        (BatchShape(prefill_chunks=((512, 1024), (100, 0)), num_decode=8, decode_kv_sum=8 * 700), None),
        (BatchShape(num_decode=1, decode_kv_sum=9), 1),
    ]
    for shape, padded in shapes:
        mean_kv = np.array([shape.decode_kv_sum / shape.num_decode]) if shape.num_decode else np.zeros(1)
        total, _ = cm.totals(shape, mean_kv, padded)
        assert float(total[0]) == pytest.approx(sum(cm.breakdown(shape, padded).values()), rel=1e-12)


def test_a_log_line_reads_the_same_for_one_point_as_for_many():
    """One step takes LogLine's scalar path, a bulk-decode stretch the vectorised one: they agree, inside,
    below and above the table (linear extrapolation in log-log)."""
    from emulator.costmodel.grid import LogLine

    line = LogLine(np.array([1.0, 16.0, 256.0, 4096.0]), np.array([2e-5, 3e-5, 9e-5, 8e-4]))
    xs = np.array([0.25, 1.0, 3.0, 16.0, 100.0, 4095.0, 4096.0, 20000.0])
    many = line(xs)
    for x, want in zip(xs, many, strict=True):
        assert line(np.array([x]))[0] == pytest.approx(want, rel=1e-12)
        assert line.scalar(float(x)) == pytest.approx(want, rel=1e-12)
    assert line(np.array([3.0])).shape == (1,)


def _pool_cost_models():
    """Every (non-AFD) pool of every example, plus a sliding-window model (gpt-oss) and a PP pool."""
    from emulator.build import cost_model_for
    from emulator.spec import load_clusters
    from emulator.topology import place

    out = []
    for path in example_files():
        for cluster in load_clusters(path):
            topo = place(cluster.spec)
            for pool in cluster.spec.pools:
                if pool.afd is None and get_role(pool.role).engine:
                    out.append((f"{cluster.name}/{pool.name}", cost_model_for(cluster.spec, pool, topo)))
    doc = load_clusters(example("quickstart.yaml"))[0].model_dump(by_alias=True, exclude_none=True)
    doc["spec"]["model"] = {"name": "openai/gpt-oss-120b"}
    doc["spec"]["gpu"] = "h200-sxm"
    doc["spec"]["pools"][0]["pp"] = 1
    from emulator.spec import InferenceCluster

    oss = InferenceCluster.model_validate(doc)
    out.append(("gpt-oss-120b", cost_model_for(oss.spec, oss.spec.pools[0], place(oss.spec))))
    return out


def test_a_decode_stretch_is_priced_as_its_steps_are_to_the_last_bit():
    """``decode_stretch_s`` prices a simulated stretch's steps at once. A short stretch (up to
    SHORT_STRETCH steps, most of them) in plain floats: each step exactly what ``step_time`` gives that
    step alone. A longer one through ``decode_totals`` (no step interval, no zero terms): each step
    exactly what ``totals`` and the host side give it. (The two paths may differ in the last bit:
    numpy's log and exp are not libm's.)"""
    from emulator.costmodel.step import SHORT_STRETCH

    checked = short = 0
    for name, model in _pool_cost_models():
        for batch, kv_start, steps in ((1, 1, 3), (8, 8 * 900, 40), (31, 31 * 2048, 7), (200, 200 * 5000, 5)):
            got = model.decode_stretch_s(batch, kv_start, steps)
            shape = BatchShape(num_decode=batch, decode_kv_sum=kv_start)
            padded = model.graph_tokens(shape)
            mean_kv = (kv_start + np.arange(steps, dtype=np.int64) * batch) / batch
            total, interval = model.kernels.totals(shape, mean_kv, padded)
            expected, _ = model._combine(total, interval, model.host_s(shape), padded is not None)
            if steps <= SHORT_STRETCH and model.kernels.decode_totals_short(batch, kv_start, steps, padded) is not None:
                one_by_one = [
                    model.step_time(BatchShape(num_decode=batch, decode_kv_sum=kv_start + j * batch)).total_s
                    for j in range(steps)
                ]
                assert got.tolist() == one_by_one, (name, batch)
                assert got.tolist() == pytest.approx(expected.tolist(), rel=1e-12), (name, batch)
                short += 1
            else:
                assert got.tolist() == expected.tolist(), (name, batch)
            checked += 1
    assert checked >= 20 and short >= 10


def test_a_steps_seconds_in_plain_floats_equal_the_array_path_to_the_last_bit():
    """``step_time`` prices one step in plain floats (the emulation's and the simulator's commonest call);
    the array path it stands in for must give exactly the same seconds, prefills, decodes and mixes."""
    rng = random.Random(7)
    shapes = [BatchShape(num_decode=1, decode_kv_sum=1)]
    for _ in range(120):
        decodes = rng.choice([0, 1, 3, 8, 31, 64, 200])
        chunks = tuple((rng.randint(1, 4096), rng.randint(0, 8192)) for _ in range(rng.choice([0, 0, 1, 2])))
        if not decodes and not chunks:
            continue
        shapes.append(BatchShape(chunks, decodes, decodes * rng.randint(1, 16384)))
    checked = 0
    for name, model in _pool_cost_models():
        fast_calls = model.kernels.step_seconds
        for shape in shapes:
            fast = model.step_time(shape)
            model.kernels.step_seconds = lambda *a, **k: None  # the array path
            try:
                slow = model.step_time(shape)
            finally:
                del model.kernels.step_seconds
            assert (fast.total_s, fast.interval_s) == (slow.total_s, slow.interval_s), (name, shape)
            checked += fast_calls(shape, model.graph_tokens(shape)) is not None
    assert checked > len(shapes) * 5  # the float path ran for most pools (not those with attention DP or DSA)
