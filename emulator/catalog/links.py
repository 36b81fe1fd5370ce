"""Link-tier catalog: bandwidth per endpoint (one direction) and one-way latency.

Bandwidth is per GPU endpoint: an instance of g GPUs sends over g such ports.

Sources:
  [NVL]  NVIDIA NVLink/NVSwitch pages: NVLink 3 600 GB/s, NVLink 4 900 GB/s,
         NVLink 5 1.8 TB/s bidirectional per GPU; GB200 NVL72 = 72 GPUs in one
         NVLink 5 domain.
  [AIC]  aiconfigurator system.yaml: intra_node_bw, inter_node_bw, pcie_bw per GPU,
         p2p_latency 10 us ("nonofficial correction based on observations").
  [DES]  infemu DESIGN.md sources: NVLink per GPU one direction A100 300 GB/s,
         H100 450 GB/s, B200 900 GB/s; ConnectX-7 400 Gbit/s ~ 50 GB/s per GPU;
         NCCL small-message all-reduce ~16 us on 8x H100.
  [IB]   InfiniBand Trade Association roadmap: HDR 200, NDR 400, XDR 800 Gb/s per port.
  Latencies of the scale-out tiers are end-to-end software latencies of a
  point-to-point GPU transfer (RDMA verbs plus transfer engine), an assumption of
  the order of [AIC]'s p2p_latency; Ethernet/TCP tiers add the kernel stack.
  They are tunable per spec (topology.*.latencyUs).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LinkTier:
    name: str
    kind: str  # scale-up | scale-out | pcie
    bandwidth: float  # bytes/s per GPU endpoint, one direction
    latency_s: float
    domain_size: int | None = None  # GPUs in one scale-up domain, for NVSwitch tiers


TIERS: dict[str, LinkTier] = {
    t.name: t
    for t in (
        LinkTier("nvlink3", "scale-up", 300e9, 10e-6, 8),  # [NVL], [AIC] a100 intra_node_bw
        LinkTier("nvlink4", "scale-up", 450e9, 10e-6, 8),  # [NVL], [AIC] h100, [DES]
        LinkTier("nvlink5", "scale-up", 900e9, 10e-6, 8),  # [NVL], [AIC] b200, [DES]
        LinkTier("nvl72", "scale-up", 900e9, 10e-6, 72),  # [NVL] GB200 NVL72 domain
        LinkTier("pcie4", "pcie", 32e9, 5e-6),  # [AIC] a100 pcie_bw
        LinkTier("pcie5", "pcie", 64e9, 5e-6),  # [AIC] h100 pcie_bw
        LinkTier("ib-hdr-200", "scale-out", 25e9, 15e-6),  # [IB], [AIC] a100 inter_node_bw
        LinkTier("ib-ndr-400", "scale-out", 50e9, 15e-6),  # [IB], [AIC] h100, [DES] CX7
        LinkTier("ib-xdr-800", "scale-out", 100e9, 15e-6),  # [IB], [AIC] b200 inter_node_bw
        LinkTier("roce-200", "scale-out", 25e9, 20e-6),  # 200GbE RoCEv2 per GPU
        LinkTier("roce-400", "scale-out", 50e9, 20e-6),  # 400GbE RoCEv2 per GPU
        LinkTier("ethernet-100", "scale-out", 12.5e9, 50e-6),  # 100GbE TCP, shared per node
        LinkTier("ethernet-25", "scale-out", 3.125e9, 50e-6),  # 25GbE TCP
        LinkTier("ethernet-10", "scale-out", 1.25e9, 50e-6),  # 10GbE TCP
    )
}


def get_tier(name: str) -> LinkTier:
    key = name.lower()
    if key not in TIERS:
        raise KeyError(f"unknown link tier {name!r}; known: {', '.join(TIERS)}")
    return TIERS[key]
