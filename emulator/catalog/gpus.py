"""GPU catalog: the hardware numbers the roofline and the KV capacity need.

Sources (every number below cites one of these):
  [AIC]  ai-dynamo/aiconfigurator systems/<gpu>.yaml (commit 095f58a, Apache-2.0),
         copied in ../shared/data/profiles/aiconfigurator/<gpu>/system.yaml.
  [A100] NVIDIA A100 Tensor Core GPU datasheet (2021): 312 TFLOP/s dense BF16,
         80 GB HBM2e at 2,039 GB/s, NVLink 3 600 GB/s bidirectional.
  [H100] NVIDIA H100 Tensor Core GPU datasheet (SXM5): 989 TFLOP/s dense BF16,
         1,979 TFLOP/s dense FP8, 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s bidirectional.
  [H200] NVIDIA H200 Tensor Core GPU datasheet (SXM): H100 compute, 141 GB HBM3e at 4.8 TB/s.
  [B200] NVIDIA DGX B200 / HGX B200 datasheet: 2.25 PFLOP/s dense BF16, 4.5 PFLOP/s
         dense FP8 per GPU, 180 GB HBM3e at 7.7 TB/s (as [AIC]), NVLink 5 1.8 TB/s bidirectional.
  [CX]   NVIDIA ConnectX-6 (HDR 200 Gb/s), ConnectX-7 (NDR 400 Gb/s), ConnectX-8
         (XDR 800 Gb/s) product briefs; one NIC per GPU in HGX systems ([AIC] node.inter_node_bw).
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3


@dataclass(frozen=True)
class GPU:
    """One accelerator. Bandwidths are bytes/s in one direction; FLOP/s are dense."""

    name: str
    bf16_flops: float
    fp8_flops: float | None
    hbm_bytes: float
    hbm_bw: float
    nvlink_bw: float
    nic_gbps: float
    pcie_bw: float
    default_scale_up_tier: str
    default_scale_out_tier: str
    table: str | None
    # Achievable fraction of peak HBM bandwidth and fixed per-kernel latency used by
    # the roofline where no profiled table exists. [AIC] mem_bw_empirical_scaling_factor
    # = 0.8 and mem_empirical_constant_latency = 3 us for every system.
    mem_efficiency: float = 0.8
    kernel_latency_s: float = 3e-6

    def flops(self, dtype: str) -> float:
        if dtype == "fp8":
            if self.fp8_flops is None:
                raise ValueError(f"{self.name} has no FP8 tensor cores")
            return self.fp8_flops
        return self.bf16_flops


GPUS: dict[str, GPU] = {
    g.name: g
    for g in (
        GPU(
            name="a100-sxm-80g",
            bf16_flops=312e12,  # [A100], [AIC] bfloat16_tc_flops
            fp8_flops=None,  # Ampere has no FP8 tensor cores [A100]
            hbm_bytes=80 * GiB,  # [AIC] mem_capacity 85899345920
            hbm_bw=2.039e12,  # [A100], [AIC] mem_bw
            nvlink_bw=300e9,  # [A100] 600 GB/s bidirectional; [AIC] intra_node_bw
            nic_gbps=200.0,  # [CX] ConnectX-6 HDR; [AIC] inter_node_bw 25 GB/s
            pcie_bw=32e9,  # PCIe 4.0 x16; [AIC] pcie_bw
            default_scale_up_tier="nvlink3",
            default_scale_out_tier="ib-hdr-200",
            table="a100-sxm-80g",
        ),
        GPU(
            name="h100-sxm",
            bf16_flops=989e12,  # [H100], [AIC]
            fp8_flops=1979e12,  # [H100] (1978 in [AIC])
            hbm_bytes=80 * GiB,  # [AIC] mem_capacity
            hbm_bw=3.35e12,  # [H100], [AIC]
            nvlink_bw=450e9,  # [H100] 900 GB/s bidirectional; [AIC] intra_node_bw
            nic_gbps=400.0,  # [CX] ConnectX-7 NDR; [AIC] inter_node_bw 50 GB/s
            pcie_bw=64e9,  # PCIe 5.0 x16; [AIC]
            default_scale_up_tier="nvlink4",
            default_scale_out_tier="ib-ndr-400",
            table="h100-sxm",
        ),
        GPU(
            name="h200-sxm",
            bf16_flops=989e12,  # [H200], [AIC]
            fp8_flops=1979e12,  # [H200]
            hbm_bytes=141 * GiB,  # [AIC] mem_capacity 151397597184
            hbm_bw=4.8e12,  # [H200], [AIC]
            nvlink_bw=450e9,  # [H200], [AIC] intra_node_bw
            nic_gbps=400.0,  # [CX] ConnectX-7; [AIC]
            pcie_bw=64e9,  # [AIC]
            default_scale_up_tier="nvlink4",
            default_scale_out_tier="ib-ndr-400",
            table="h200-sxm",
        ),
        GPU(
            name="b200",
            bf16_flops=2250e12,  # [B200], [AIC]
            fp8_flops=4500e12,  # [B200], [AIC]
            hbm_bytes=180 * GiB,  # [AIC] mem_capacity 193273528320
            hbm_bw=7.7e12,  # [AIC]
            nvlink_bw=900e9,  # [B200] 1.8 TB/s bidirectional; [AIC] intra_node_bw
            nic_gbps=800.0,  # [CX] ConnectX-8 XDR; [AIC] inter_node_bw 100 GB/s
            pcie_bw=128e9,  # PCIe 6.0 x16; [AIC]
            default_scale_up_tier="nvlink5",
            default_scale_out_tier="ib-xdr-800",
            table="b200",
        ),
    )
}

ALIASES = {
    "a100": "a100-sxm-80g",
    "a100-80g": "a100-sxm-80g",
    "a100-sxm": "a100-sxm-80g",
    "h100": "h100-sxm",
    "h200": "h200-sxm",
    "b200-sxm": "b200",
}


def get_gpu(name: str) -> GPU:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}")
    return GPUS[key]
