"""The engine's own config, with vLLM's field names, mapped once from a pool spec.

KV capacity follows vLLM's memory profiling: HBM × gpu_memory_utilization minus
the weights of one GPU's shard minus a reserve for activations, NCCL buffers and
CUDA graphs; the rest is split into blocks of ``block_size`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.catalog.gpus import GPU, GiB
from emulator.catalog.models import DTYPE_BYTES, ModelArch

# aiconfigurator system.yaml misc.nccl_mem (bytes by TP size) and misc.other_mem
# (3.5 GiB "for safer deployment"), the same for every system in ../shared/data.
NCCL_MEM_BYTES = {1: 0, 2: 358_612_992, 4: 411_041_792, 8: 411_041_792}
OTHER_MEM_BYTES = 3.5 * GiB


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    num_gpu_blocks: int
    max_model_len: int
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    pipeline_parallel_size: int = 1


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory budget of one instance, in bytes (reported by ``infemu cost``)."""

    usable: float
    weights: float
    reserve: float
    kv: float
    kv_bytes_per_token_per_gpu: float
    num_gpu_blocks: int


def kv_split(model: ModelArch, tp: int) -> int:
    """How many ways one layer's KV is split across TP ranks (replicated beyond kv_heads; MLA never split)."""
    if model.is_mla:
        return 1
    return min(tp, model.kv_heads)


def memory_plan(
    model: ModelArch,
    gpu: GPU,
    *,
    dtype: str,
    kv_dtype: str,
    tp: int,
    pp: int,
    block_size: int,
    gpu_memory_utilization: float,
    max_num_batched_tokens: int,
) -> MemoryPlan:
    usable = gpu.hbm_bytes * gpu_memory_utilization
    weights = model.weight_bytes(dtype) / (tp * pp)
    act_per_token = (4 * model.hidden + 2 * max(model.intermediate, model.moe_intermediate) / tp) * DTYPE_BYTES["bf16"]
    reserve = OTHER_MEM_BYTES + NCCL_MEM_BYTES.get(tp, NCCL_MEM_BYTES[8]) + max_num_batched_tokens * act_per_token
    kv = usable - weights - reserve
    per_token = model.kv_bytes_per_token(kv_dtype) / pp / kv_split(model, tp)
    blocks = int(kv // (per_token * block_size)) if kv > 0 else 0
    return MemoryPlan(usable, weights, reserve, max(kv, 0.0), per_token, blocks)
