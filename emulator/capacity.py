"""Per-pool memory plan and context limit from a spec: the one mapping that validation, the
simulator and the workers share."""

from __future__ import annotations

from emulator.catalog.gpus import GPU
from emulator.catalog.models import ModelArch
from emulator.engine.config import MemoryPlan, memory_plan
from emulator.spec import ClusterSpec, PoolSpec


def pool_memory_plan(spec: ClusterSpec, pool: PoolSpec, model: ModelArch, gpu: GPU) -> MemoryPlan:
    return memory_plan(
        model,
        gpu,
        dtype=spec.model.dtype,
        kv_dtype=spec.model.kv_dtype,
        tp=pool.tp,
        pp=pool.pp,
        block_size=pool.block_size,
        gpu_memory_utilization=pool.gpu_memory_utilization,
        max_num_batched_tokens=pool.max_num_batched_tokens,
    )


def effective_max_model_len(pool: PoolSpec, model: ModelArch) -> int:
    return pool.max_model_len or model.max_model_len
