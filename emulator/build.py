"""From a validated spec to what each instance runs: its engine config and its cost model.

The simulator, the emulated workers and the operator use the same mapping, so every
driver sees identical engines.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.capacity import effective_max_model_len, pool_limits, pool_memory_plan, profile_of
from emulator.catalog.gpus import get_gpu
from emulator.catalog.models import ModelArch
from emulator.checkpoint import served_model
from emulator.costmodel.engines import EngineProfile
from emulator.costmodel.instance import InstanceConfig, instance_cost_model
from emulator.costmodel.step import EngineStepModel
from emulator.engine.config import EngineConfig, MemoryPlan
from emulator.spec import ClusterSpec, PoolSpec
from emulator.topology import Instance, Topology, place


@dataclass(frozen=True)
class InstanceSetup:
    instance: Instance
    pool: PoolSpec
    engine: EngineConfig
    memory: MemoryPlan
    cost: EngineStepModel


def engine_config(
    spec: ClusterSpec, pool: PoolSpec, model: ModelArch, profile: EngineProfile | None = None
) -> tuple[EngineConfig, MemoryPlan]:
    """One scheduler per instance; an attention-DP group schedules its ranks' budgets together."""
    gpu = get_gpu(spec.gpu)
    profile = profile or profile_of(spec)
    plan = pool_memory_plan(spec, pool, model, gpu)
    limits = pool_limits(spec, pool, gpu)
    cfg = EngineConfig(
        max_num_seqs=min(limits.max_num_seqs, plan.max_state_seqs or limits.max_num_seqs) * pool.dp,
        max_num_batched_tokens=limits.max_num_batched_tokens * pool.dp,
        block_size=pool.block_size,
        num_gpu_blocks=plan.num_gpu_blocks,
        max_model_len=effective_max_model_len(pool, model),
        enable_prefix_caching=limits.prefix_caching,
        enable_chunked_prefill=limits.chunked_prefill,
        pipeline_parallel_size=pool.pp,
        prefill_first=profile.scheduling == "prefill_first",
        reserve_full_sequence=profile.reserve_full_sequence,
    )
    return cfg, plan


def cost_model_for(
    spec: ClusterSpec,
    pool: PoolSpec,
    topo: Topology,
    inst: Instance | None = None,
    profile: EngineProfile | None = None,
) -> EngineStepModel:
    model = served_model(spec.model)
    kernels = instance_cost_model(
        InstanceConfig(
            model=model,
            gpu=topo.gpu,
            tp=pool.tp,
            pp=pool.pp,
            ep=pool.ep,
            dp=pool.dp,
            intra_tier=topo.scale_up,
            scale_out_tier=topo.scale_out,
            domain_size=topo.domain_size,
            step_overhead_s=pool.step_overhead_us * 1e-6,
        )
    )
    return EngineStepModel(kernels, profile or profile_of(spec))


def build_instances(spec: ClusterSpec, profile: EngineProfile | None = None) -> tuple[Topology, list[InstanceSetup]]:
    model = served_model(spec.model)
    topo = place(spec)
    pools = {p.name: p for p in spec.pools}
    setups = []
    for inst in topo.instances:
        pool = pools[inst.pool]
        cfg, plan = engine_config(spec, pool, model, profile)
        setups.append(InstanceSetup(inst, pool, cfg, plan, cost_model_for(spec, pool, topo, inst, profile)))
    return topo, setups
