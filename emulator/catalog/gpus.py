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
  [B300] Verda, "NVIDIA GB300 NVL72: GPU Architecture & Performance" (per-GPU table, dense):
         B300 FP4 14 PF, FP8 4.5 PF, BF16 2.25 PF, 270 GB usable HBM3e of 288 GB, 7.7 TB/s;
         G. Lockwood, "B300" (glennklockwood.com): 288 GB HBM3e, 8 TB/s, NVLink 5 2x900 GB/s.
  [GB200] NVIDIA GB200 NVL72 product page, rack totals / 72 GPUs (dense): FP4 720 PF -> 10 PF,
         FP8 360 PF -> 5 PF, BF16 180 PF -> 2.5 PF, 13.4 TB HBM3e -> 186 GB at 8 TB/s; one
         72-GPU NVLink 5 domain (130 TB/s).
  [GB300] NVIDIA GB300 NVL72 product page and [B300]'s table: FP4 15 PF, FP8 5 PF, BF16 2.5 PF
         per GPU (dense), 20.7 TB HBM3e -> 288 GB at 8 TB/s, ConnectX-8 800 Gb/s per GPU.
  B200's FP4 dense peak: 9 PF ([B300]'s table; NVIDIA DGX B200 datasheet 72 PF for 8 GPUs).

Blackwell Ultra and Grace-Blackwell GPUs have no kernel tables of their own: their tables
are B200's (same SM architecture, same per-GPU BF16/FP8 tensor throughput to within 11%,
same HBM3e bandwidth class), and ``table_speedup`` scales compute-bound table entries by
the ratio of peak tensor throughput per precision. FP4 needs Blackwell: on Hopper an NVFP4 or
MXFP4 checkpoint runs weight-only (W4A16, Marlin kernels) on BF16 tensor cores.
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
    fp4_flops: float | None = None
    arch: str = "hopper"  # ampere | hopper | blackwell: which low-precision kernels exist
    # Compute-bound speed-up of this GPU over its table's GPU, per compute precision (1 = same).
    table_speedup: tuple[tuple[str, float], ...] = ()

    def compute_dtype(self, precision: str) -> str:
        """The tensor-core precision a weight precision runs at on this GPU.

        FP8 weights run FP8 GEMMs (Hopper and later); FP4 weights run FP4 GEMMs on Blackwell
        (MXFP4 experts as MXFP4 x MXFP8 in vLLM's FlashInfer TRT-LLM kernels, the table's
        ``w4a8_mxfp4_mxfp8``) and weight-only W4A16 elsewhere; INT4 is always weight-only.
        """
        if precision in ("fp8", "fp8_block"):
            return "fp8" if self.fp8_flops is not None else "bf16"
        if precision == "nvfp4":
            return "fp4" if self.fp4_flops is not None else "bf16"
        if precision == "mxfp4":
            return "fp8" if self.fp4_flops is not None else "bf16"
        return "bf16"

    def flops(self, dtype: str) -> float:
        if dtype in ("fp8", "fp8_block"):
            if self.fp8_flops is None:
                raise ValueError(f"{self.name} has no FP8 tensor cores")
            return self.fp8_flops
        if dtype == "fp4":
            if self.fp4_flops is None:
                raise ValueError(f"{self.name} has no FP4 tensor cores")
            return self.fp4_flops
        return self.bf16_flops

    def speedup(self, compute_dtype: str) -> float:
        return dict(self.table_speedup).get(compute_dtype, 1.0)


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
            arch="ampere",
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
            fp4_flops=9000e12,  # [B300] table, DGX B200 datasheet
            arch="blackwell",
        ),
        GPU(
            name="b300",
            bf16_flops=2250e12,  # [B300]
            fp8_flops=4500e12,  # [B300]
            hbm_bytes=270e9,  # [B300] usable of 288 GB
            hbm_bw=7.7e12,  # [B300]
            nvlink_bw=900e9,  # [B300] NVLink 5
            nic_gbps=800.0,  # [CX] ConnectX-8
            pcie_bw=128e9,  # PCIe 6.0 x16 [B300]
            default_scale_up_tier="nvlink5",
            default_scale_out_tier="ib-xdr-800",
            table="b200",
            fp4_flops=14000e12,  # [B300]
            arch="blackwell",
            table_speedup=(("fp4", 14000 / 9000),),
        ),
        GPU(
            name="gb200",
            bf16_flops=2500e12,  # [GB200]
            fp8_flops=5000e12,  # [GB200]
            hbm_bytes=186e9,  # [GB200]
            hbm_bw=8.0e12,  # [GB200]
            nvlink_bw=900e9,  # [GB200] NVLink 5, 72-GPU domain
            nic_gbps=400.0,  # [CX] ConnectX-7 per GPU in GB200 NVL72 compute trays
            pcie_bw=128e9,
            default_scale_up_tier="nvl72",
            default_scale_out_tier="ib-ndr-400",
            table="b200",
            fp4_flops=10000e12,  # [GB200]
            arch="blackwell",
            table_speedup=(("bf16", 2500 / 2250), ("fp8", 5000 / 4500), ("fp4", 10000 / 9000)),
        ),
        GPU(
            name="gb300",
            bf16_flops=2500e12,  # [GB300]
            fp8_flops=5000e12,  # [GB300]
            hbm_bytes=288e9,  # [GB300]
            hbm_bw=8.0e12,  # [GB300]
            nvlink_bw=900e9,  # [GB300] NVLink 5, 72-GPU domain
            nic_gbps=800.0,  # [GB300] ConnectX-8
            pcie_bw=128e9,
            default_scale_up_tier="nvl72",
            default_scale_out_tier="ib-xdr-800",
            table="b200",
            fp4_flops=15000e12,  # [GB300]
            arch="blackwell",
            table_speedup=(("bf16", 2500 / 2250), ("fp8", 5000 / 4500), ("fp4", 15000 / 9000)),
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
    "b300-sxm": "b300",
    "b200_sxm": "b200",
    "b300_sxm": "b300",
    "h100_sxm": "h100-sxm",
    "h200_sxm": "h200-sxm",
    "gb200-nvl72": "gb200",
    "gb300-nvl72": "gb300",
}


def get_gpu(name: str) -> GPU:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GPUS:
        raise KeyError(f"unknown GPU {name!r}; known: {', '.join(sorted(GPUS))}")
    return GPUS[key]
