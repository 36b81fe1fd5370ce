"""Per instance and tier: the logical rate, the byte scale S and the rate on the wire.

One function shared by the worker (which paces or marks its sends) and the
launcher (which builds the tc tree), so both backends shape to the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from emulator.catalog.links import LinkTier
from emulator.net.inproc import byte_scale
from emulator.spec import ClusterSpec
from emulator.topology import Instance, Topology

DEFAULT_WIRE_RATE = 40e6  # bytes/s per shaped link; `infemu doctor` measures what this host shapes well


@dataclass(frozen=True)
class TierLink:
    tier: LinkTier
    logical_rate: float  # bytes/s of the emulated hardware: tier bandwidth x the instance's GPUs
    scale: float  # S: bytes on the wire = logical bytes / S
    wire_rate: float  # payload bytes/s on the wire: logical_rate / S / dilation
    latency_s: float  # tier latency x dilation


def link_plan(
    spec: ClusterSpec, topo: Topology, inst: Instance, target_rate: float = DEFAULT_WIRE_RATE
) -> dict[str, TierLink]:
    overrides = {
        topo.scale_up.name: spec.topology.scale_up.byte_scale,
        topo.scale_out.name: spec.topology.scale_out.byte_scale,
    }
    dilation = spec.emulation.time_dilation
    out = {}
    tiers = {t.name: t for t in (topo.scale_up, topo.scale_out, *(t for _, t in topo.host_tiers))}
    for tier in tiers.values():
        # a GPU-less instance (a kvstore, a CPU retriever) sends through its node's NICs: one per GPU slot
        logical = tier.bandwidth * (inst.num_gpus or topo.gpus_per_node)
        scale = overrides.get(tier.name) or byte_scale(logical / dilation, target_rate)
        out[tier.name] = TierLink(tier, logical, scale, logical / scale / dilation, tier.latency_s * dilation)
    return out
