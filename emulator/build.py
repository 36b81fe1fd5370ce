"""From a validated spec to what each instance runs: its engine config and its cost model.

The simulator, the emulated workers and the operator use the same mapping, so every
driver sees identical engines.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.capacity import effective_max_model_len, ffn_group_size, pool_limits, pool_memory_plan, profile_of
from emulator.catalog.gpus import get_gpu
from emulator.catalog.models import ModelArch
from emulator.checkpoint import served_model
from emulator.costmodel.afd import AfdConfig, AfdKernels
from emulator.costmodel.engines import EngineProfile
from emulator.costmodel.instance import InstanceConfig, instance_cost_model
from emulator.costmodel.step import EngineStepModel
from emulator.engine.config import EngineConfig, MemoryPlan
from emulator.roles import get_role
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
        async_scheduling=profile.async_scheduling,
        max_prefill_chunk=limits.max_num_batched_tokens if pool.dp > 1 else None,
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
    if pool.afd is not None:  # an attention pool, or a decode pool whose MoE layers run on an ffn pool
        return EngineStepModel(afd_kernels(spec, pool, topo, model, inst), profile or profile_of(spec))
    kernels = instance_cost_model(_instance_config(pool, topo, model))
    return EngineStepModel(kernels, profile or profile_of(spec))


def _instance_config(pool: PoolSpec, topo: Topology, model: ModelArch, **over) -> InstanceConfig:
    """One pool's kernels as placed: its parallelism, the tiers around it, its expert routing."""
    fields = dict(
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
        moe_distribution=pool.expert_routing,
    )
    return InstanceConfig(**{**fields, **over})


def afd_partners(spec: ClusterSpec, topo: Topology, inst: Instance) -> list[Instance]:
    """The FFN instances of an attention instance's AFD group: its share of the ffn pool, in order."""
    pool = next(p for p in spec.pools if p.name == inst.pool)
    ffn_pool = next(p for p in spec.pools if p.name == pool.afd.ffn_pool)
    y = ffn_group_size(spec, ffn_pool)
    members = [i for i in topo.instances if i.pool == ffn_pool.name]
    return members[inst.index * y : (inst.index + 1) * y]


def afd_kernels(
    spec: ClusterSpec, pool: PoolSpec, topo: Topology, model: ModelArch, inst: Instance | None
) -> AfdKernels:
    """An attention pool's group: its ranks, its FFN instances and the slowest tier between them."""
    ffn_pool = next(p for p in spec.pools if p.name == pool.afd.ffn_pool)
    inst = inst or next(i for i in topo.instances if i.pool == pool.name)
    partners = afd_partners(spec, topo, inst)
    tiers = [topo.tier_between(inst, f) for f in partners] or [topo.scale_out]
    tier = min(tiers, key=lambda t: t.bandwidth)
    attention = instance_cost_model(
        _instance_config(pool, topo, model, ep=1, moe_distribution=ffn_pool.expert_routing, part="attention")
    )
    cfg = AfdConfig(
        attention=attention.cfg,
        ffn_instances=ffn_group_size(spec, ffn_pool),
        ffn_gpus_per_instance=ffn_pool.tp * ffn_pool.dp,
        ffn_ep=ffn_pool.ep,
        tier=tier,
        micro_batches=pool.afd.micro_batches,
    )
    return AfdKernels(cfg, attention)


def build_instances(spec: ClusterSpec, profile: EngineProfile | None = None) -> tuple[Topology, list[InstanceSetup]]:
    model = served_model(spec.model)
    topo = place(spec)
    pools = {p.name: p for p in spec.pools}
    setups = []
    for inst in topo.instances:
        pool = pools[inst.pool]
        if not get_role(pool.role).engine:
            continue  # a member of another pool's engine (AFD's FFN side): placed, not scheduled
        cfg, plan = engine_config(spec, pool, model, profile)
        setups.append(InstanceSetup(inst, pool, cfg, plan, cost_model_for(spec, pool, topo, inst, profile)))
    return topo, setups
