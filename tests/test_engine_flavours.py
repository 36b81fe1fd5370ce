"""Scheduling as each engine flavour does it, and the P/D livelock regression."""

from __future__ import annotations

from dataclasses import replace

from builders import create_request, create_scheduler, run_to_completion

from emulator.build import engine_config
from emulator.catalog.models import get_model
from emulator.engine.scheduler import Scheduler
from emulator.sim.simulator import Simulation
from emulator.spec import parse_cluster
from emulator.workload.plan import build_plan


def prefill_first(sched: Scheduler) -> Scheduler:
    return Scheduler(replace(sched.config, prefill_first=True))


def test_mixed_steps_put_prefill_chunks_beside_running_decodes():
    s = create_scheduler(max_num_batched_tokens=4096)
    for i in range(4):
        s.add_request(create_request(f"d{i}", 100, 50))
    out = s.schedule(0.0)
    s.update_from_output(out, 0.01)  # all four now decode
    s.add_request(create_request("new", 1000, 10))
    out = s.schedule(0.02)
    assert out.shape.num_decode == 4 and [q for q, _ in out.shape.prefill_chunks] == [1000]


def test_prefill_first_steps_pause_decoding_while_a_prompt_can_progress():
    s = prefill_first(create_scheduler(max_num_batched_tokens=4096))
    for i in range(4):
        s.add_request(create_request(f"d{i}", 100, 50))
    s.update_from_output(s.schedule(0.0), 0.01)
    s.add_request(create_request("new", 1000, 10))
    out = s.schedule(0.02)
    assert out.shape.num_decode == 0 and [q for q, _ in out.shape.prefill_chunks] == [1000]
    s.update_from_output(out, 0.05)
    out = s.schedule(0.06)  # nothing left to prefill: everyone decodes, the new request too
    assert out.shape.num_decode == 5 and not out.shape.prefill_chunks
    s.update_from_output(out, 0.07)
    finished, _ = run_to_completion(s)
    assert sorted(finished) == ["d0", "d1", "d2", "d3", "new"]


def test_a_long_prompt_is_chunked_over_prefill_only_steps():
    s = prefill_first(create_scheduler(max_num_batched_tokens=1000))
    s.add_request(create_request("d", 10, 100))
    s.update_from_output(s.schedule(0.0), 0.01)
    s.add_request(create_request("long", 2500, 5))
    chunks = []
    for step in range(3):
        out = s.schedule(0.02 + step)
        chunks.append((out.shape.num_decode, [q for q, _ in out.shape.prefill_chunks]))
        s.update_from_output(out, 0.03 + step)
    assert chunks == [(0, [1000]), (0, [1000]), (0, [500])]


def test_a_request_computes_at_most_its_ranks_budget_per_step():
    """An attention-DP group sums its ranks' budgets, but one request's prompt runs on one rank."""
    s = Scheduler(replace(create_scheduler(max_num_batched_tokens=4096).config, max_prefill_chunk=1024))
    s.add_request(create_request("a", 3000, 5))
    s.add_request(create_request("b", 500, 5))
    out = s.schedule(0.0)
    assert [q for q, _ in out.shape.prefill_chunks] == [1024, 500]
    s.update_from_output(out, 0.01)
    assert [q for q, _ in s.schedule(0.01).shape.prefill_chunks] == [1024]


def test_sglang_splits_its_default_chunk_over_the_attention_dp_ranks():
    """SGLang's chunked-prefill size is the DP group's (server_args._handle_data_parallelism divides it
    by dp_size); vLLM's token budget is each DP engine's own. An explicit budget is per rank for both."""

    def config(engine: str, **pool):
        doc = {
            "apiVersion": "infemu.io/v1alpha1",
            "kind": "InferenceCluster",
            "metadata": {"name": "dp"},
            "spec": {
                "model": "deepseek-ai/DeepSeek-V3",
                "gpu": "b200",
                "engine": {"name": engine},
                "topology": {"nodes": 1, "gpusPerNode": 8},
                "pools": [{"name": "agg", "replicas": 1, "tp": 1, "dp": 8, "ep": 8, **pool}],
            },
        }
        spec = parse_cluster(doc).spec
        return engine_config(spec, spec.pools[0], get_model("deepseek-ai/DeepSeek-V3"))[0]

    sglang = config("sglang")
    assert (sglang.max_prefill_chunk, sglang.max_num_batched_tokens) == (2048, 16384)  # 16,384 // 8 a rank
    vllm = config("vllm")
    assert (vllm.max_prefill_chunk, vllm.max_num_batched_tokens) == (8192, 8 * 8192)
    explicit = config("sglang", maxNumBatchedTokens=4096)
    assert (explicit.max_prefill_chunk, explicit.max_num_batched_tokens) == (4096, 8 * 4096)


def test_guaranteed_no_evict_admits_only_what_can_finish_and_never_preempts():
    base = create_scheduler(num_blocks=40, block_size=16, max_num_batched_tokens=4096)  # 640 tokens of KV
    s = Scheduler(replace(base.config, reserve_full_sequence=True))
    for i in range(6):
        s.add_request(create_request(f"r{i}", 100, 100))  # each needs 200 tokens = 13 blocks to finish
    out = s.schedule(0.0)
    assert len(out.scheduled) == 3  # 3 x 13 = 39 blocks set aside; a fourth would not fit
    s.update_from_output(out, 0.01)
    finished, _ = run_to_completion(s)
    assert len(finished) == 6 and s.num_preemptions == 0
    # without the reservation the same load preempts
    v = create_scheduler(num_blocks=40, block_size=16, max_num_batched_tokens=4096)
    for i in range(6):
        v.add_request(create_request(f"r{i}", 100, 100))
    run_to_completion(v)
    assert v.num_preemptions > 0


def test_a_request_larger_than_the_whole_cache_is_rejected_explicitly():
    s = create_scheduler(num_blocks=10, block_size=16)
    req = create_request("huge", 150, 20)
    out = s.add_request(req)
    assert out is not None and out.finished and out.finish_reason == "error"
    assert req.error == "the request needs 170 tokens of KV cache but this instance holds only 160"
    # past the context window too: that is what it is told (what vLLM's API server answers first)
    narrow = create_scheduler(num_blocks=10, block_size=16, max_model_len=128)
    req = create_request("long", 150, 20)
    narrow.add_request(req)
    assert req.error.startswith("This model's maximum context length is 128 tokens. However, you requested 170")


PD_SMALL_DECODE = {
    "apiVersion": "infemu.io/v1alpha1",
    "kind": "InferenceCluster",
    "metadata": {"name": "pd-small"},
    "spec": {
        "model": "llama-3.1-8b",
        "gpu": "h100-sxm",
        "topology": {"nodes": 1, "gpusPerNode": 8},
        "pools": [
            {"name": "prefill", "role": "prefill", "replicas": 2, "maxModelLen": 8192},
            # a decode instance with room for only ~26k tokens of KV: it fills, preempts and must recover
            {"name": "decode", "role": "decode", "maxModelLen": 8192, "gpuMemoryUtilization": 0.28},
        ],
        "router": {"policy": "pd"},
        "workload": {
            "arrival": {"type": "poisson"},
            "rate": 20,
            "requests": 400,
            "inputLength": {"type": "uniform", "min": 1000, "max": 6000},
            "outputLength": {"type": "uniform", "min": 100, "max": 800},
        },
    },
}


def test_pd_with_a_full_decode_cache_completes_every_request():
    """Regression: consumers whose KV had arrived waited behind a preempted request that needed their
    very blocks to recompute; nothing ever ran again and 383 of 400 requests never completed."""
    c = parse_cluster(PD_SMALL_DECODE)
    sim = Simulation(c, build_plan(c.spec.workload))
    res = sim.run()
    decode = next(i for i in sim.instances if i.role == "decode")
    assert decode.scheduler.num_preemptions > 0  # the situation that used to livelock
    assert res.summary["completed"] == 400 and res.summary["failed"] == 0
    for inst in sim.instances:
        assert not inst.scheduler.has_work() and not inst.scheduler.held


def _async(s: Scheduler) -> Scheduler:
    return Scheduler(replace(s.config, async_scheduling=True))


def test_async_scheduling_puts_a_request_that_came_during_a_step_into_the_step_after_the_next():
    """vLLM >= 0.14 and SGLang's overlap scheduler decide step n+1 when step n starts: a request that
    arrives while step n runs missed n+1's decision. A synchronous engine takes it into n+1."""
    for is_async, joins_at in ((False, 1), (True, 2)):
        s = create_scheduler(max_num_batched_tokens=4096)
        s = _async(s) if is_async else s
        for i in range(4):
            s.add_request(create_request(f"d{i}", 100, 50))
        step = s.schedule(0.0)  # step 1 runs; a request comes meanwhile
        s.add_request(create_request("new", 500, 10), during_step=True)
        for k in range(1, 4):
            s.update_from_output(step, 0.01 * k)
            step = s.schedule(0.01 * k)
            if [q for q, _ in step.shape.prefill_chunks] == [500]:
                break
        assert k == joins_at, (is_async, k)
        assert step.shape.num_decode == 4


def test_async_scheduling_takes_a_request_at_once_when_nothing_else_would_run():
    """An engine with nothing to run next decides no step ahead: the request that comes is not delayed."""
    s = _async(create_scheduler(max_num_batched_tokens=4096))
    s.add_request(create_request("last", 100, 1))
    step = s.schedule(0.0)  # its only token: the request ends with this step
    s.add_request(create_request("new", 300, 5), during_step=True)
    s.update_from_output(step, 0.01)
    step = s.schedule(0.01)
    assert [q for q, _ in step.shape.prefill_chunks] == [300]
    # and a request that comes to an idle engine is never held back
    idle = _async(create_scheduler())
    idle.add_request(create_request("a", 100, 5))
    assert idle.schedule(0.0).shape.prefill_chunks == ((100, 0),)


def test_async_scheduling_holds_a_prefill_first_engine_to_decoding_for_one_step():
    s = _async(prefill_first(create_scheduler(max_num_batched_tokens=4096)))
    for i in range(4):
        s.add_request(create_request(f"d{i}", 100, 50))
    step = s.schedule(0.0)
    s.add_request(create_request("new", 1000, 10), during_step=True)
    s.update_from_output(step, 0.01)
    step = s.schedule(0.01)  # decided before "new" came: the four decode
    assert step.shape.num_decode == 4 and not step.shape.prefill_chunks
    s.update_from_output(step, 0.02)
    step = s.schedule(0.02)
    assert step.shape.num_decode == 0 and [q for q, _ in step.shape.prefill_chunks] == [1000]


def _one_llama(engine: dict, **spec):
    """A one-instance Llama-3.1-8B cluster on an H100 with these engine settings."""
    doc = {
        "apiVersion": "infemu.io/v1alpha1",
        "kind": "InferenceCluster",
        "metadata": {"name": "lag"},
        "spec": {
            "model": "llama-3.1-8b",
            "gpu": "h100-sxm",
            "engine": {"name": "vllm", **engine},
            "pools": [{"name": "agg", "replicas": 1}],
            **spec,
        },
    }
    return parse_cluster(doc)


def test_the_admission_lag_is_off_in_the_profiles_and_a_spec_turns_it_on():
    """Off by default: the fitted constants scored better without it (engines.yaml, docs/fidelity.md)."""
    from emulator.costmodel.engines import engine_profile

    assert not any(engine_profile(name).async_scheduling for name in ("vllm", "sglang", "trtllm", "ideal"))

    def config(**engine):
        spec = _one_llama(engine).spec
        return engine_config(spec, spec.pools[0], get_model("llama-3.1-8b"))[0]

    assert not config().async_scheduling
    assert config(asyncScheduling=True).async_scheduling


def test_a_simulated_async_engine_costs_each_newcomer_about_one_decode_step_of_ttft():
    """Poisson arrivals to a busy engine: each request misses the step decided before it came, a decode
    step here (about one TPOT); nothing else changes (same steps, same decode pace)."""
    import numpy as np

    def run(is_async: bool):
        c = _one_llama(
            {"asyncScheduling": is_async},
            workload={
                "arrival": {"type": "poisson"},
                "rate": 8,
                "requests": 300,
                "inputLength": {"type": "fixed", "value": 512},
                "outputLength": {"type": "fixed", "value": 200},
            },
        )
        res = Simulation(c, build_plan(c.spec.workload)).run()
        assert res.summary["completed"] == 300
        done = [r for r in res.records if r.ok]
        return np.mean([r.ttft_ms for r in done]), np.mean([r.tpot_ms for r in done])

    (sync_ttft, sync_tpot), (async_ttft, async_tpot) = run(False), run(True)
    assert abs(async_tpot / sync_tpot - 1) < 0.01
    assert 0.5 * sync_tpot < async_ttft - sync_ttft < 1.5 * sync_tpot
