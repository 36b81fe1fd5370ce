"""The engine's own config, with vLLM's field names, mapped once from a pool spec.

KV capacity follows vLLM's memory profiling: HBM × gpu_memory_utilization minus
the weights of one GPU's shard minus a reserve for activations, NCCL buffers and
CUDA graphs, minus the bounded per-sequence state of sliding-window and
linear-attention layers for ``max_num_seqs`` sequences; the rest is split into
blocks of ``block_size`` tokens. An attention-DP group pools its ranks' blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.catalog.gpus import GPU, GiB
from emulator.catalog.models import DTYPE_BYTES, ModelArch
from emulator.catalog.quant import Quantization, weight_bytes

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
    # SGLang-style scheduling: a step either prefills (new requests admitted, decodes paused)
    # or decodes; vLLM and TensorRT-LLM mix prefill chunks into decode steps.
    prefill_first: bool = False
    # TensorRT-LLM's default capacity policy (GUARANTEED_NO_EVICT): a request is admitted only when
    # the blocks for its whole sequence (prompt + max tokens) can be set aside, so nothing is ever
    # preempted; vLLM and SGLang admit on the prompt and preempt when decodes run out of blocks.
    reserve_full_sequence: bool = False
    # The most prompt tokens one request computes in a step: an attention-DP group schedules its ranks
    # together (budgets summed), but a request lives on one rank and gets at most that rank's budget.
    # None: the whole step budget.
    max_prefill_chunk: int | None = None
    # Async scheduling (vLLM >= 0.14, SGLang's and TensorRT-LLM's overlap schedulers): the engine decides
    # step n+1 when step n starts, so a request that arrives while a step runs joins the step after the
    # next. An idle engine, or one with nothing else to run next, takes it at once.
    async_scheduling: bool = False

    @property
    def prefill_chunk_limit(self) -> int:
        """The most tokens one request may compute in a step (its rank's budget)."""
        return self.max_prefill_chunk or self.max_num_batched_tokens


@dataclass(frozen=True)
class MemoryPlan:
    """Per-GPU memory budget of one instance, in bytes (reported by ``infemu cost``)."""

    usable: float
    weights: float
    reserve: float
    kv: float
    kv_bytes_per_token_per_gpu: float
    num_gpu_blocks: int
    max_state_seqs: int | None = None  # running sequences the per-sequence state pool holds (per rank)


def kv_split(model: ModelArch, tp: int) -> int:
    """How many ways one layer's KV is split across TP ranks (replicated beyond kv_heads; MLA never split)."""
    if model.is_mla:
        return 1
    return min(tp, model.kv_heads)


def weights_per_gpu(
    model: ModelArch, quant: Quantization, tp: int, pp: int, dp: int = 1, experts_elsewhere: bool = False
) -> float:
    """One GPU's share: routed experts spread over every GPU of a stage (tp x dp), the rest over tp.
    ``experts_elsewhere``: an AFD attention rank, whose routed and shared experts live on FFN GPUs."""
    experts = model.moe_layers * model.routed_expert_params() * weight_bytes(quant.moe)
    rest = model.weight_bytes(quant) - experts
    if experts_elsewhere:
        return (rest - expert_side_bytes(model, quant, 1, 1)[1]) / tp / pp
    return (rest / tp + experts / (tp * dp)) / pp


def expert_side_bytes(model: ModelArch, quant: Quantization, ffn_gpus: int, ffn_tp: int) -> tuple[float, float]:
    """(routed, shared) expert bytes one FFN GPU holds: routed experts over every FFN GPU of a group,
    shared experts replicated per FFN instance and split over its GPUs (ffn_tp)."""
    routed = model.moe_layers * model.routed_expert_params() * weight_bytes(quant.moe) / ffn_gpus
    shared = model.moe_layers * model.shared_expert_params() * weight_bytes(quant.gemm) / ffn_tp
    return routed, shared


def memory_plan(
    model: ModelArch,
    gpu: GPU,
    *,
    quant: Quantization,
    tp: int,
    pp: int,
    block_size: int,
    gpu_memory_utilization: float,
    max_num_batched_tokens: int,
    dp: int = 1,
    max_num_seqs: int = 0,
    fraction_of_free: bool = False,
    experts_elsewhere: bool = False,
) -> MemoryPlan:
    """``fraction_of_free``: the fraction applies to what is left after weights and activations
    (TensorRT-LLM's kv_cache_config.free_gpu_memory_fraction) instead of to all of HBM (vLLM's
    gpu_memory_utilization, SGLang's mem_fraction_static)."""
    weights = weights_per_gpu(model, quant, tp, pp, dp, experts_elsewhere)
    usable = gpu.hbm_bytes * gpu_memory_utilization
    if fraction_of_free:
        usable = weights + (gpu.hbm_bytes - weights) * gpu_memory_utilization
    act_per_token = (4 * model.hidden + 2 * max(model.intermediate, model.moe_intermediate) / tp) * DTYPE_BYTES["bf16"]
    reserve = OTHER_MEM_BYTES + NCCL_MEM_BYTES.get(tp, NCCL_MEM_BYTES[8]) + max_num_batched_tokens * act_per_token
    # Bounded per-sequence state (sliding windows, linear-attention states) gets its own pool for the
    # running sequences, at most half of what is left (both frameworks split hybrid models' memory
    # between a state pool and the token KV cache); it caps the running sequences.
    per_seq = model.kv_bytes_per_seq(quant.kv_cache) / pp / max(1, tp)
    left = usable - weights - reserve
    max_state_seqs = None
    if per_seq > 0 and left > 0:
        pool = min(per_seq * max_num_seqs, left / 2)
        reserve += pool
        max_state_seqs = max(1, int(pool // per_seq))
    kv = usable - weights - reserve
    per_token = model.kv_bytes_per_token(quant.kv_cache) / pp / kv_split(model, tp)
    blocks = int(kv // (per_token * block_size)) * dp if kv > 0 and per_token > 0 else 0
    if per_token == 0 and kv > 0:  # no per-token KV at all (every layer bounded): capacity is not the limit
        blocks = 1_000_000
    return MemoryPlan(usable, weights, reserve, max(kv, 0.0), per_token, blocks, max_state_seqs)
