"""From a validated spec to what each instance runs: its engine config and its cost model.

The simulator uses this now; the emulated workers and the operator use the
same mapping, so every driver sees identical engines.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.capacity import effective_max_model_len, pool_memory_plan
from emulator.catalog.gpus import get_gpu
from emulator.catalog.models import ModelArch, get_model
from emulator.costmodel.instance import InstanceConfig, InstanceCostModel, instance_cost_model
from emulator.engine.config import EngineConfig, MemoryPlan
from emulator.spec import ClusterSpec, PoolSpec
from emulator.topology import Instance, Topology, place


@dataclass(frozen=True)
class InstanceSetup:
    instance: Instance
    pool: PoolSpec
    engine: EngineConfig
    memory: MemoryPlan
    cost: InstanceCostModel


def engine_config(spec: ClusterSpec, pool: PoolSpec, model: ModelArch) -> tuple[EngineConfig, MemoryPlan]:
    plan = pool_memory_plan(spec, pool, model, get_gpu(spec.gpu))
    cfg = EngineConfig(
        max_num_seqs=pool.max_num_seqs,
        max_num_batched_tokens=pool.max_num_batched_tokens,
        block_size=pool.block_size,
        num_gpu_blocks=plan.num_gpu_blocks,
        max_model_len=effective_max_model_len(pool, model),
        enable_prefix_caching=pool.prefix_caching,
        enable_chunked_prefill=pool.chunked_prefill,
        pipeline_parallel_size=pool.pp,
    )
    return cfg, plan


def cost_model_for(
    spec: ClusterSpec, pool: PoolSpec, topo: Topology, inst: Instance | None = None
) -> InstanceCostModel:
    model = get_model(spec.model.name)
    intra = topo.intra_instance_tier(inst) if inst is not None else topo.scale_up
    return instance_cost_model(
        InstanceConfig(
            model=model,
            gpu=topo.gpu,
            dtype=spec.model.dtype,
            kv_dtype=spec.model.kv_dtype,
            tp=pool.tp,
            pp=pool.pp,
            ep=pool.ep,
            intra_tier=intra,
            step_overhead_s=pool.step_overhead_us * 1e-6,
        )
    )


def build_instances(spec: ClusterSpec) -> tuple[Topology, list[InstanceSetup]]:
    model = get_model(spec.model.name)
    topo = place(spec)
    pools = {p.name: p for p in spec.pools}
    setups = []
    for inst in topo.instances:
        pool = pools[inst.pool]
        cfg, plan = engine_config(spec, pool, model)
        setups.append(InstanceSetup(inst, pool, cfg, plan, cost_model_for(spec, pool, topo, inst)))
    return topo, setups
