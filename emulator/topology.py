"""Placement of instances on emulated GPUs, and the link tier between any two of them.

Instances are packed in spec order, node by node; a TP×PP group never straddles
a scale-up domain unless the spec allows it. The tier between two instances is
the scale-up tier when they share a domain and the scale-out tier otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.catalog.gpus import GPU, get_gpu
from emulator.catalog.links import LinkTier, get_tier
from emulator.spec import ClusterSpec, PoolSpec


@dataclass(frozen=True)
class Instance:
    """One serving instance: a pool replica on a set of GPUs."""

    name: str
    pool: str
    role: str
    index: int
    gpus: tuple[int, ...]  # global GPU ids: node * gpus_per_node + local id
    node: int
    domain: int

    @property
    def num_gpus(self) -> int:
        return len(self.gpus)


class PlacementError(ValueError):
    pass


@dataclass(frozen=True)
class Topology:
    gpu: GPU
    nodes: int
    gpus_per_node: int
    domain_size: int
    scale_up: LinkTier
    scale_out: LinkTier
    instances: tuple[Instance, ...]
    spans_domains: frozenset[str]  # instances whose GPUs straddle scale-up domains
    # GPU-less instances (a kvstore, a CPU retriever) reached over a tier of their own (kvstore.tier)
    host_tiers: tuple[tuple[str, LinkTier], ...] = ()

    def domain_of(self, gpu_id: int) -> int:
        return gpu_id // self.domain_size

    def tier_between(self, a: Instance, b: Instance) -> LinkTier:
        if a.name == b.name:
            return self.scale_up
        if not a.gpus or not b.gpus:  # host memory and cores: through the node's NICs (or its own tier)
            return self.host_tier(a if not a.gpus else b)
        if a.name in self.spans_domains or b.name in self.spans_domains:
            return self.scale_out
        return self.scale_up if a.domain == b.domain else self.scale_out

    def host_tier(self, inst: Instance) -> LinkTier:
        """How a GPU-less instance (a kvstore, a CPU retriever) is reached: its own tier, or the network."""
        return dict(self.host_tiers).get(inst.name) or self.scale_out

    def intra_instance_tier(self, inst: Instance) -> LinkTier:
        return self.scale_out if inst.name in self.spans_domains else self.scale_up

    def tier_matrix(self) -> list[list[str]]:
        """Tier name between every pair of instances (row, column in placement order)."""
        return [[self.tier_between(a, b).name for b in self.instances] for a in self.instances]

    def to_json(self) -> dict:
        return {
            "gpu": self.gpu.name,
            "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "scale_up": {
                "tier": self.scale_up.name,
                "domain_size": self.domain_size,
                "bandwidth_gbps": self.scale_up.bandwidth * 8 / 1e9,
                "latency_us": self.scale_up.latency_s * 1e6,
            },
            "scale_out": {
                "tier": self.scale_out.name,
                "bandwidth_gbps": self.scale_out.bandwidth * 8 / 1e9,
                "latency_us": self.scale_out.latency_s * 1e6,
            },
            "instances": [
                {
                    "name": i.name,
                    "pool": i.pool,
                    "role": i.role,
                    "gpus": list(i.gpus),
                    "node": i.node,
                    "domain": i.domain,
                    "spans_domains": i.name in self.spans_domains,
                }
                for i in self.instances
            ],
            "tiers": {"names": [i.name for i in self.instances], "matrix": self.tier_matrix()},
        }

    def by_name(self, name: str) -> Instance:
        for inst in self.instances:
            if inst.name == name:
                return inst
        raise KeyError(name)


def resolve_tiers(spec: ClusterSpec, gpu: GPU) -> tuple[LinkTier, LinkTier]:
    up = get_tier(spec.topology.scale_up.tier or gpu.default_scale_up_tier)
    out = get_tier(spec.topology.scale_out.tier or gpu.default_scale_out_tier)
    if spec.topology.scale_up.latency_us is not None:
        up = LinkTier(up.name, up.kind, up.bandwidth, spec.topology.scale_up.latency_us * 1e-6, up.domain_size)
    if spec.topology.scale_out.latency_us is not None:
        out = LinkTier(out.name, out.kind, out.bandwidth, spec.topology.scale_out.latency_us * 1e-6)
    return up, out


def instance_name(pool: PoolSpec, index: int) -> str:
    return f"{pool.name}-{index}"


def place(spec: ClusterSpec) -> Topology:
    """Pack every pool replica onto GPUs; raise PlacementError naming the pool that does not fit."""
    gpu = get_gpu(spec.gpu)
    up, out = resolve_tiers(spec, gpu)
    topo = spec.topology
    domain = min(topo.scale_up.size, topo.nodes * topo.gpus_per_node)
    total = topo.nodes * topo.gpus_per_node
    free = list(range(total))
    instances: list[Instance] = []
    spans: set[str] = set()
    host_tiers: list[tuple[str, LinkTier]] = []
    for pi, pool in enumerate(spec.pools):
        need = pool.gpus_per_instance
        for r in range(pool.replicas):
            name = instance_name(pool, r)
            if need == 0:  # a kvstore or a CPU retriever: a node's memory and cores, spread over the nodes
                node = r % topo.nodes
                instances.append(Instance(name, pool.name, pool.role, r, (), node, node * topo.gpus_per_node // domain))
                if pool.kvstore is not None and pool.kvstore.tier:
                    host_tiers.append((name, get_tier(pool.kvstore.tier)))
                continue
            if pool.placement is not None:
                chosen = _explicit(pool, pi, r, need, free, total)
                if len({g // domain for g in chosen}) > 1:
                    if not topo.allow_cross_domain_tp:
                        raise PlacementError(
                            f"spec.pools[{pi}].placement[{r}]: GPUs {chosen} straddle scale-up domains of {domain}; "
                            "pick GPUs in one domain or set topology.allowCrossDomainTp"
                        )
                    spans.add(name)
                for g in chosen:
                    free.remove(g)
                instances.append(
                    Instance(
                        name,
                        pool.name,
                        pool.role,
                        r,
                        tuple(chosen),
                        chosen[0] // topo.gpus_per_node,
                        chosen[0] // domain,
                    )
                )
                continue
            chosen = _take_within_domain(free, need, domain)
            if chosen is None:
                if not topo.allow_cross_domain_tp or len(free) < need:
                    raise PlacementError(
                        f"spec.pools[{pi}]: replica {r} needs {need} GPUs "
                        + (
                            f"within one {domain}-GPU scale-up domain"
                            if len(free) >= need
                            else f"but only {len(free)} of {total} GPUs are left"
                        )
                        + "; add nodes, lower tp/pp/replicas"
                        + ("" if topo.allow_cross_domain_tp else " or set topology.allowCrossDomainTp")
                    )
                chosen = free[:need]
                spans.add(name)
            for g in chosen:
                free.remove(g)
            instances.append(
                Instance(
                    name=name,
                    pool=pool.name,
                    role=pool.role,
                    index=r,
                    gpus=tuple(chosen),
                    node=chosen[0] // topo.gpus_per_node,
                    domain=chosen[0] // domain,
                )
            )
    return Topology(
        gpu, topo.nodes, topo.gpus_per_node, domain, up, out, tuple(instances), frozenset(spans), tuple(host_tiers)
    )


def _explicit(pool: PoolSpec, pi: int, r: int, need: int, free: list[int], total: int) -> list[int]:
    at = f"spec.pools[{pi}].placement"
    if len(pool.placement) != pool.replicas:
        raise PlacementError(f"{at}: {len(pool.placement)} entries for {pool.replicas} replicas; give one per replica")
    chosen = list(pool.placement[r])
    if len(chosen) != need or len(set(chosen)) != need:
        raise PlacementError(f"{at}[{r}]: {chosen} must name {need} distinct GPUs (tp*pp)")
    bad = [g for g in chosen if not 0 <= g < total]
    if bad:
        raise PlacementError(f"{at}[{r}]: GPU ids {bad} outside 0..{total - 1}")
    taken = [g for g in chosen if g not in free]
    if taken:
        raise PlacementError(f"{at}[{r}]: GPUs {taken} are already used by another instance")
    return chosen


def _take_within_domain(free: list[int], need: int, domain: int) -> list[int] | None:
    by_domain: dict[int, list[int]] = {}
    for g in free:
        by_domain.setdefault(g // domain, []).append(g)
    for gpus in by_domain.values():
        if len(gpus) >= need:
            return gpus[:need]
    return None
