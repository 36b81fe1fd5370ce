"""``attention``: the attention side of attention-FFN disaggregation (AFD; MegaScale-Infer,
arXiv:2504.02263; Step-3, arXiv:2507.19427). Each replica is one logical engine: ``dp`` attention
ranks of ``tp`` GPUs hold the KV cache and run attention with the dense layers, and for every MoE
layer send their activations to the ``afd.ffnPool`` instances that hold the experts and take the
results back, ping-ponging ``afd.microBatches`` micro-batches so that the exchange overlaps compute.
A ``decode`` pool may take ``afd`` too: P/D with an AFD decode side."""

from __future__ import annotations

from emulator.roles import RoleInfo

AFD_ROLES = ("attention", "decode")  # pools that may send their MoE layers to an ffn pool


def afd_pairs(spec) -> list[tuple[int, object, object | None]]:
    """(index, pool, its ffn pool or None) for every attention pool and every decode pool with afd."""
    pools = {p.name: p for p in spec.pools}
    out = []
    for i, pool in enumerate(spec.pools):
        if pool.role == "attention" or (pool.role in AFD_ROLES and pool.afd is not None):
            ffn = pools.get(pool.afd.ffn_pool) if pool.afd else None
            out.append((i, pool, ffn if ffn is not None and ffn.role == "ffn" else None))
    return out


def afd_owners(spec, ffn_name: str) -> list:
    """The pools (attention, or decode with afd) whose experts live on the ffn pool ``ffn_name``."""
    return [p for p in spec.pools if p.afd is not None and p.afd.ffn_pool == ffn_name]


def ffn_per_group(attention, ffn) -> int:
    """y of the xA-yF ratio: FFN instances per attention replica."""
    return ffn.replicas // max(attention.replicas, 1)


def _problems(spec) -> list[str]:
    from emulator.catalog.models import get_model

    problems = []
    model = get_model(spec.model.name)
    for i, pool, ffn in afd_pairs(spec):
        at = f"spec.pools[{i}]"
        if pool.afd is None:
            problems.append(f"{at}.afd: an attention pool needs afd.ffnPool naming the ffn pool with its experts")
            continue
        if ffn is None:
            names = [p.name for p in spec.pools if p.role == "ffn"]
            problems.append(
                f"{at}.afd.ffnPool: {pool.afd.ffn_pool!r} is not a pool with role ffn"
                + (f"; ffn pools: {', '.join(names)}" if names else "; add one")
            )
            continue
        if not model.is_moe:
            problems.append(
                f"{at}.role: attention-FFN disaggregation splits an MoE model's experts from attention;"
                f" {model.name} is dense (use role aggregated, or prefill + decode)"
            )
            continue
        if pool.pp > 1:
            problems.append(f"{at}.pp: {pool.pp}: an attention pool runs every layer on each rank; use pp: 1")
        if pool.ep > 1:
            problems.append(f"{at}.ep: {pool.ep}: the experts live on the ffn pool; set ep on {ffn.name!r}")
        y = ffn_per_group(pool, ffn)
        if pool.replicas and (y < 1 or ffn.replicas % pool.replicas):
            problems.append(
                f"{at}.replicas: {pool.replicas} attention groups must share the {ffn.replicas} instances of"
                f" {ffn.name!r} evenly; make ffn replicas a multiple of {pool.replicas}"
            )
        elif pool.replicas and model.num_experts % (y * ffn.ep):
            problems.append(
                f"{at}.afd: {model.num_experts} experts cannot be split over {y} FFN instance(s) x ep {ffn.ep};"
                " pick ffn replicas and ep that divide the experts"
            )
    return problems


ROLE = RoleInfo(
    name="attention",
    summary="attention + dense layers and the KV cache of an AFD group; its experts run on an ffn pool",
    engine=True,
    front=True,
    gateway_label="both",
    problems=_problems,
)
