"""The host-side engine model: CUDA-graph padding, async overlap, per-sequence cost, eager launches;
engine profiles by version; collectives across scale-up domains."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from emulator.catalog.gpus import get_gpu
from emulator.catalog.links import get_tier
from emulator.catalog.models import get_model
from emulator.costmodel.collectives import Collectives
from emulator.costmodel.engines import HostCosts, engine_profile, version_key
from emulator.costmodel.instance import InstanceConfig, InstanceCostModel
from emulator.costmodel.interface import BatchShape
from emulator.costmodel.step import EngineStepModel
from emulator.costmodel.tables import load_tables


def step_model(host: HostCosts, engine: str = "vllm", model: str = "llama-3.1-8b") -> EngineStepModel:
    kernels = InstanceCostModel(InstanceConfig(get_model(model), get_gpu("h100-sxm")))
    return EngineStepModel(kernels, replace(engine_profile(engine), host=host))


def decode(batch: int, kv: int = 1024) -> BatchShape:
    return BatchShape(num_decode=batch, decode_kv_sum=batch * kv)


def test_a_decode_batch_is_padded_to_the_next_capture_size():
    sm = step_model(HostCosts())
    assert sm.profile.cuda_graph_sizes[:5] == (1, 2, 4, 8, 16)
    assert sm.graph_tokens(decode(3)) == 4 and sm.graph_tokens(decode(100)) == 104
    assert sm.graph_tokens(decode(600)) is None  # beyond vLLM's 512: eager
    # the padded GEMMs cost what the captured size costs; attention sees the real sequences
    gemm = sm.breakdown(decode(100))["mlp_gate_up"]
    assert gemm == pytest.approx(sm.breakdown(decode(104))["mlp_gate_up"])
    assert sm.breakdown(decode(100))["attention_decode"] < sm.breakdown(decode(104))["attention_decode"]


def test_host_work_adds_to_a_synchronous_step_and_hides_under_an_asynchronous_one():
    host = HostCosts(step_fixed_s=1e-3, per_seq_s=10e-6)
    sync = step_model(host)
    bare = step_model(HostCosts())
    async_ = step_model(replace(host, async_overlap=True))
    for b in (1, 32, 256):
        gpu = bare.step_time(decode(b)).total_s
        assert sync.step_time(decode(b)).total_s == pytest.approx(gpu + 1e-3 + 10e-6 * b)
        assert async_.step_time(decode(b)).total_s == pytest.approx(max(gpu, 1e-3 + 10e-6 * b))
    # the per-sequence cost grows the step with the batch
    assert sync.host_s(decode(256)) - sync.host_s(decode(1)) == pytest.approx(255 * 10e-6)
    # and the breakdown names it
    assert sync.breakdown(decode(8))["host_step"] == pytest.approx(1e-3 + 80e-6)


def test_an_eager_step_takes_at_least_the_launches():
    sm = step_model(HostCosts(eager_launch_s=1e-3))  # 1 ms per kernel launch: far above the GPU time
    small = BatchShape(prefill_chunks=((16, 0),))
    assert sm.graph_tokens(small) == 16  # piecewise graphs cover small mixed steps
    big = BatchShape(prefill_chunks=((2048, 0),))
    assert sm.graph_tokens(big) is None
    assert sm.step_time(big).total_s >= sm.kernels.eager_kernels() * 1e-3 >= 32 * 10 * 1e-3  # 32 layers


def test_the_launch_count_follows_the_layers_structure():
    """An eager MoE/MLA layer launches about twice a dense layer's kernels; TP adds its all-reduces."""

    def per_layer(model: str, tp: int = 1) -> float:
        m = get_model(model)
        return InstanceCostModel(InstanceConfig(m, get_gpu("h200-sxm"), tp=tp)).eager_kernels() / m.layers

    dense, moe = per_layer("llama-3.1-8b"), per_layer("deepseek-ai/DeepSeek-R1", tp=8)
    assert 8 <= dense <= 12 and 1.8 * dense <= moe <= 2.5 * dense
    assert per_layer("llama-3.1-8b", tp=2) == pytest.approx(dense + 2)


def test_sglang_and_trtllm_run_every_step_with_prompt_tokens_eagerly():
    """SGLang replays graphs for decode batches only (its extend batches launch kernel by kernel) and
    TensorRT-LLM for generation-only iterations, so a short prompt pays the launches there, not on vLLM."""
    small = BatchShape(prefill_chunks=((16, 0),))
    for engine in ("sglang", "trtllm"):
        sm = step_model(HostCosts(eager_launch_s=1e-3), engine=engine)
        assert sm.graph_tokens(small) is None
        assert sm.graph_tokens(decode(8)) == 8  # decode batches still replay graphs
        assert sm.step_time(small).total_s >= 32 * 1e-3
        assert sm.breakdown(small)["host_eager_launch"] > 0
    vllm = step_model(HostCosts(eager_launch_s=1e-3))
    assert vllm.step_time(small).total_s < 32 * 1e-3


def test_an_unknown_prefill_graph_mode_is_refused_with_the_field():
    from emulator.costmodel.engines import _prefill_graphs

    with pytest.raises(ValueError, match=r"sglang\.cuda_graphs\.prefill is 'full'; use piecewise or eager"):
        _prefill_graphs("sglang", "full")


def test_decode_stretch_equals_step_by_step_with_padding_and_host_work():
    sm = step_model(HostCosts(step_fixed_s=0.4e-3, per_seq_s=3e-6, async_overlap=True))
    stretch = sm.decode_stretch_s(37, 37 * 900, 50)
    singles = [sm.step_time(BatchShape(num_decode=37, decode_kv_sum=37 * 900 + j * 37)).total_s for j in range(50)]
    assert np.allclose(stretch, singles, rtol=1e-12, atol=0)


def test_profiles_by_version():
    assert version_key("0.5.10.post1") > version_key("0.5.9")
    assert version_key("nightly-dev") == (float("inf"),)
    old, new = engine_profile("vllm", "0.12.0"), engine_profile("vllm", "0.24.1")
    assert old.gpu_memory_utilization == 0.9 and new.gpu_memory_utilization == 0.92
    assert engine_profile("vllm", None).version == new.version  # unversioned: the newest profile
    assert engine_profile("sglang").scheduling == "prefill_first" and engine_profile("vllm").scheduling == "mixed"
    assert engine_profile("trtllm").reserve_full_sequence and not engine_profile("vllm").reserve_full_sequence
    with pytest.raises(KeyError, match="unknown engine"):
        engine_profile("tgi")


def test_all_reduce_across_nodes_is_hierarchical_not_linear_in_gpus():
    tables = load_tables("h200-sxm")
    col = Collectives(tables, get_tier("nvlink4"), get_tier("ib-ndr-400"), 8)
    msg = 64 * 7168 * 2  # a decode step's activations
    t8 = col.all_reduce(8)[0].scalar(msg)
    t16, src = col.all_reduce(16)
    t64 = col.all_reduce(64)[0].scalar(msg)
    assert "hierarchical" in src
    # crossing to a second node costs more; beyond that the latency grows with log2 of the nodes (NCCL's
    # trees), not with the GPU count (a ring's 2(n-1) hops: 126 x 15 us = 1.9 ms for 64 GPUs)
    assert t8 < t16.scalar(msg) < t64 < 2.5 * t16.scalar(msg)
    assert t64 < 0.1 * 2 * 63 * get_tier("ib-ndr-400").latency_s
    # inside one NVL72 domain a 64-GPU all-reduce never touches the scale-out tier
    nvl = Collectives(None, get_tier("nvl72"), get_tier("ib-xdr-800"), 72)
    line, src = nvl.all_reduce(64)
    assert src == "alpha-beta" and line.scalar(msg) < 100e-6


def test_a_collective_never_costs_more_than_a_larger_message():
    """B200's profiled custom all-reduce on 8 GPUs switches algorithm at 256 KiB (26 us there, 17 us at
    1 MiB); an engine pads or picks the larger message's algorithm, so the line is monotone."""
    col = Collectives(load_tables("b200"), get_tier("nvlink5"), get_tier("ib-ndr-400"), 8)
    line = col.all_reduce(8)[0]
    sizes = np.geomspace(1024, 64 * 2**20, 200)
    times = line(sizes)
    assert np.all(np.diff(times) >= -1e-15)
    assert line.scalar(16 * 8192 * 2) <= line.scalar(2**20)  # a 16-token step of a 70B model
