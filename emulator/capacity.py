"""Per-pool limits, memory plan and context limit from a spec: the one mapping that validation,
the simulator and the workers share.

Limits a pool leaves unset take the serving engine's defaults (``spec.engine``), which
depend on the GPU's memory as the frameworks' own defaults do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from emulator.catalog.gpus import GPU
from emulator.catalog.models import ModelArch
from emulator.costmodel.engines import EngineProfile, engine_profile
from emulator.engine.config import MemoryPlan, expert_side_bytes, memory_plan
from emulator.roles.attention import afd_owners, ffn_per_group
from emulator.spec import ClusterSpec, PoolSpec


@dataclass(frozen=True)
class PoolLimits:
    """Per attention-DP rank (one engine), as the framework would run it."""

    max_num_seqs: int
    max_num_batched_tokens: int
    gpu_memory_utilization: float
    chunked_prefill: bool
    prefix_caching: bool


def profile_of(spec: ClusterSpec) -> EngineProfile:
    profile = engine_profile(spec.engine.name, spec.engine.version)
    if spec.engine.scheduling != "auto":
        profile = replace(profile, scheduling=spec.engine.scheduling)
    if spec.engine.async_scheduling is not None:
        profile = replace(profile, async_scheduling=spec.engine.async_scheduling)
    if spec.engine.pd_handoff_ms is not None:
        profile = replace(profile, api=replace(profile.api, pd_handoff_s=spec.engine.pd_handoff_ms * 1e-3))
    return profile


def pool_limits(spec: ClusterSpec, pool: PoolSpec, gpu: GPU) -> PoolLimits:
    profile = profile_of(spec)
    tokens, seqs = profile.batch_defaults(gpu.hbm_bytes)
    if profile.dp_divides_token_budget and pool.dp > 1:
        tokens = max(1, tokens // pool.dp)  # SGLang: the default chunk is the DP group's, a rank gets its share
    return PoolLimits(
        max_num_seqs=pool.max_num_seqs or seqs,
        max_num_batched_tokens=pool.max_num_batched_tokens or tokens,
        gpu_memory_utilization=pool.gpu_memory_utilization or profile.gpu_memory_utilization,
        chunked_prefill=profile.chunked_prefill if pool.chunked_prefill is None else pool.chunked_prefill,
        prefix_caching=profile.prefix_caching if pool.prefix_caching is None else pool.prefix_caching,
    )


def pool_memory_plan(spec: ClusterSpec, pool: PoolSpec, model: ModelArch, gpu: GPU) -> MemoryPlan:
    limits = pool_limits(spec, pool, gpu)
    return memory_plan(
        model,
        gpu,
        quant=model.quant,
        tp=pool.tp,
        pp=pool.pp,
        dp=pool.dp,
        block_size=pool.block_size,
        gpu_memory_utilization=limits.gpu_memory_utilization,
        max_num_batched_tokens=limits.max_num_batched_tokens,
        max_num_seqs=limits.max_num_seqs,
        fraction_of_free=profile_of(spec).memory_fraction_of_free,
        experts_elsewhere=pool.afd is not None,
    )


def ffn_group_size(spec: ClusterSpec, ffn: PoolSpec) -> int:
    """FFN instances per AFD group (y of xA-yF): the ffn pool's replicas over its attention pool's."""
    owners = afd_owners(spec, ffn.name)
    return max(1, ffn_per_group(owners[0], ffn)) if owners else max(1, ffn.replicas)


def ffn_memory_problems(spec: ClusterSpec, pool: PoolSpec, at: str, model: ModelArch, gpu: GPU) -> list[str]:
    """An FFN GPU must hold its share of the group's routed experts and its instance's shared experts."""
    y = ffn_group_size(spec, pool)
    routed, shared = expert_side_bytes(model, model.quant, y * pool.tp * pool.dp, pool.tp * pool.dp)
    usable = gpu.hbm_bytes * pool_limits(spec, pool, gpu).gpu_memory_utilization
    if routed + shared >= usable:
        return [
            f"{at}: experts need {(routed + shared) / 1e9:.1f} GB per GPU over {y} FFN instance(s) of"
            f" {pool.tp * pool.dp} GPUs but {gpu.name} gives {usable / 1e9:.1f} GB; add ffn replicas or tp"
        ]
    return []


def effective_max_model_len(pool: PoolSpec, model: ModelArch) -> int:
    return pool.max_model_len or model.max_model_len
