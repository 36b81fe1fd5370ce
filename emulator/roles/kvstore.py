"""``kvstore``: a remote KV-cache tier shared by the engines (as Mooncake Store or LMCache run one).
It keeps KV blocks by their chained prefix hash (``kvstore/store.py``), bounded in bytes with LRU
eviction; prefill and aggregated engines look a prompt's next blocks up there, fetch them over the
store's tier when that beats recomputing (``kvstore/decide.py``) and write blocks back after each
prefill or on eviction (``serve/kvstore_app.py`` in the emulation, ``sim/stages.py`` in the simulator).
"""

from __future__ import annotations

from emulator.roles import RoleInfo, get_role


def _problems(spec) -> list[str]:
    from emulator.catalog.links import TIERS

    problems = []
    engines = [(i, p) for i, p in enumerate(spec.pools) if p.replicas > 0 and get_role(p.role).front]
    sizes = {p.block_size for _, p in engines}
    if len(sizes) > 1:
        listed = ", ".join(f"{p.name}: {p.block_size}" for _, p in engines)
        problems.append(
            f"spec.pools: a KV store keys blocks of one size, but the serving pools' blockSize differ ({listed});"
            " give them the same blockSize"
        )
    for i, p in engines:
        if p.prefix_caching is False:
            problems.append(
                f"spec.pools[{i}].prefixCaching: false, but a KV store reuses cached prefixes; enable it (or remove"
                " the kvstore pool)"
            )
    stores = [(i, p) for i, p in enumerate(spec.pools) if p.role == "kvstore" and p.replicas > 0]
    if len(stores) > 1 or any(p.replicas > 1 for _, p in stores):
        problems.append(
            "spec.pools: one kvstore pool with replicas: 1 (a store sharded over several instances is not modelled"
            " yet); give that one instance the total capacityGb"
        )
    pcie = [name for name, t in TIERS.items() if t.kind == "pcie"]
    for i, p in stores:
        tier = p.kvstore.tier
        if tier is not None and tier.lower() not in pcie:
            problems.append(
                f"spec.pools[{i}].kvstore.tier: {tier!r}: a store's own tier is a host-memory tier ({', '.join(pcie)});"
                " leave it out to reach the store over the topology's scale-out network"
            )
    if stores and any(p.role in ("attention", "ffn") for p in spec.pools):
        problems.append("spec.pools: a KV store with an AFD engine is not modelled yet; remove one of them")
    return problems


ROLE = RoleInfo(
    name="kvstore",
    summary="a remote KV-cache tier: blocks by prefix hash, LRU within its capacity",
    engine=False,
    front=False,
    problems=_problems,
    service="emulator.serve.kvstore_app:create_kvstore_app",
)
