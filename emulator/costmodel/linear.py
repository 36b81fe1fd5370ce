"""Dense GEMMs and fused-MoE experts by weight precision: profiled tables first, roofline otherwise.

Each weight precision maps to the kernel a serving framework runs on this GPU
(``GPU.compute_dtype``): FP8 and block-FP8 GEMMs on Hopper and Blackwell, NVFP4 GEMMs on
Blackwell; on Hopper an FP4 or INT4 checkpoint runs weight-only (W4A16: Marlin / Triton
kernels that read 4-bit weights and multiply in BF16). A W4A16 GEMM without its own table is
the BF16 table with the weight-read time of small batches scaled to 4-bit weights, and no
faster than the BF16 compute roofline at large batches.

GPUs that borrow another GPU's tables (B300, GB200, GB300 use B200's) divide the table by
their peak-throughput ratio, never below their own memory roofline.
"""

from __future__ import annotations

import numpy as np

from emulator.catalog.gpus import GPU
from emulator.catalog.models import DTYPE_BYTES
from emulator.catalog.quant import weight_bytes
from emulator.costmodel.grid import LogLine
from emulator.costmodel.roofline import COMPUTE_EFFICIENCY, roofline_s
from emulator.costmodel.tables import GpuTables, silicon_gemms

# Expert routings the MoE tables are profiled under (aiconfigurator's collectors: balanced, and power
# laws with exponent 1.01 and 1.2). The default is aiconfigurator's own estimating default
# (sdk/config.py ModelConfig.workload_distribution = "power_law", read as power_law_1.01 @095f58a):
# real routers wake fewer distinct experts than a perfectly balanced batch and load one rank more.
ROUTINGS = ("power_law_1.01", "power_law_1.2", "balanced")
DEFAULT_ROUTING = "power_law_1.01"

M_GRID = np.unique(np.concatenate([np.arange(1, 17), np.geomspace(16, 262144, 60).round()]))
ACT_BYTES = DTYPE_BYTES["bf16"]

# Block-scaled FP8 GEMMs are priced from the per-tensor FP8 table: aiconfigurator's collector times
# the fp8_block GEMMs eagerly (collector/vllm/collect_gemm.py: use_cuda_graph=gemm_type != "fp8_block"),
# so their small-m entries carry 50-80 us of launch gaps a CUDA-graph step never pays; at m >= 8192,
# where those gaps vanish, the two tables agree (median block/per-tensor ratio 1.02-1.06 on H100/H200).
_GEMM_TABLES = {"bf16": ("bf16",), "fp8": ("fp8",), "fp8_block": ("fp8",)}
_MOE_TABLES_HOPPER = {
    "bf16": ("bfloat16",),
    "fp8": ("fp8", "fp8_block"),
    "fp8_block": ("fp8_block", "fp8"),
    "int4_wo": ("int4_wo",),
    "mxfp4": ("w4a16_mxfp4",),
    "nvfp4": (),
}
# On Blackwell vLLM runs MXFP4 experts as MXFP4 x MXFP8 (FlashInfer TRT-LLM kernels); the W4A16 table
# (MXFP4 x BF16) is a different, slower kernel, so a shape without a W4A8 entry takes the roofline at FP8.
_MOE_TABLES_BLACKWELL = {
    **_MOE_TABLES_HOPPER,
    "nvfp4": ("nvfp4",),
    "mxfp4": ("w4a8_mxfp4_mxfp8",),
}


def no_dearer_than_larger(values: np.ndarray) -> np.ndarray:
    """A GEMM of m rows never costs more than one of more rows (same n, k): the larger kernel computes it
    with padding rows, as a CUDA-graph step pads its batch. The profiled tables break this at some
    shapes (7-17% of the BF16, FP8 and NVFP4 tables' cells lie over 10% above a larger m; B200 FP8,
    Llama-3.1-70B TP4's QKV projection: 2.6 ms at m = 4, 1.0 ms at m = 8), which made a 4-sequence
    decode step slower than an 8-sequence one where the measurements are monotone
    (silicon_calibration.csv, vLLM Llama-3.1-70B FP8 on 4 B200, 1024/1024: TPOT 8.04 ms at c4,
    8.18 ms at c8). Values are over an increasing m grid."""
    return np.minimum.accumulate(values[::-1])[::-1]


def gemm_roofline(gpu: GPU, precision: str, m, n: int, k: int):
    m = np.asarray(m, dtype=np.float64)
    compute = gpu.compute_dtype(precision)
    return roofline_s(gpu, 2.0 * m * n * k, weight_bytes(precision) * n * k + ACT_BYTES * (m * k + m * n), compute)


class LinearOps:
    def __init__(self, gpu: GPU, tables: GpuTables | None) -> None:
        self.gpu, self.tables = gpu, tables

    def _borrowed(self, values: np.ndarray, precision: str, m, n: int, k: int) -> np.ndarray:
        """Scale a borrowed table's time to this GPU's compute peak, floored at its memory roofline."""
        s = self.gpu.speedup(self.gpu.compute_dtype(precision))
        if s == 1.0:
            return values
        mem = weight_bytes(precision) * n * k / (self.gpu.hbm_bw * self.gpu.mem_efficiency)
        return np.maximum(values / s, mem + self.gpu.kernel_latency_s)

    def gemm(self, precision: str, n: int, k: int) -> tuple[LogLine, str]:
        """Latency of an (m x k) @ (k x n) GEMM over the token grid, and where it came from."""
        gpu, tables = self.gpu, self.tables
        measured = silicon_gemms(gpu.name).get((precision, n, k)) if tables is not None else None
        if measured is not None:
            return LogLine(M_GRID, no_dearer_than_larger(measured(M_GRID))), "measured on this GPU (data/silicon)"
        names = _GEMM_TABLES.get(precision, ())
        if precision == "nvfp4" and gpu.compute_dtype("nvfp4") == "fp4":
            names = ("nvfp4",)
        if tables is not None:
            for name in names:
                grid = tables.gemm(name)
                if grid is not None:
                    values = self._borrowed(grid(M_GRID, n, k), precision, M_GRID, n, k)
                    return LogLine(M_GRID, no_dearer_than_larger(values)), f"table {name}"
            bf16 = tables.gemm("bf16")
            if bf16 is not None and gpu.compute_dtype(precision) == "bf16" and precision != "bf16":
                base = self._borrowed(bf16(M_GRID, n, k), "bf16", M_GRID, n, k)
                compute = 2.0 * M_GRID * n * k / (gpu.flops("bf16") * COMPUTE_EFFICIENCY)
                values = np.maximum(base * weight_bytes(precision) / weight_bytes("bf16"), compute)
                return LogLine(
                    M_GRID, no_dearer_than_larger(values + gpu.kernel_latency_s)
                ), "table bf16, W4A16 weight reads"
        return LogLine(M_GRID, gemm_roofline(gpu, precision, M_GRID, n, k)), "roofline"

    def moe(
        self,
        precision: str,
        hidden: int,
        inter: int,
        topk: int,
        experts: int,
        moe_tp: int,
        moe_ep: int,
        distribution: str = DEFAULT_ROUTING,
    ) -> tuple[LogLine, str]:
        """Fused MoE (routed experts) latency by the tokens entering the layer, under ``distribution``
        routing (``ROUTINGS``): how many distinct experts a small batch wakes, and how much more
        the busiest GPU gets than the mean, is what makes decode steps of MoE models cost what they do."""
        gpu, tables = self.gpu, self.tables
        kernels = (_MOE_TABLES_BLACKWELL if gpu.arch == "blackwell" else _MOE_TABLES_HOPPER).get(precision, ())
        if tables is not None:
            # The requested routing first; a shape profiled under another routing only borrows that one.
            for routing in (distribution, *(r for r in ROUTINGS if r != distribution)):
                for kernel in kernels:
                    line = tables.moe_line(kernel, hidden, inter, topk, experts, moe_tp, moe_ep, routing)
                    if line is not None:
                        s = gpu.speedup(gpu.compute_dtype(precision))
                        # more tokens wake no fewer experts: the same envelope as the dense GEMMs
                        line = LogLine(np.exp(line.lx), no_dearer_than_larger(np.exp(line.ly)) / s)
                        return line, f"table {kernel}, {routing} routing"
        # Per GPU: the busiest expert-parallel rank sets the pace; experts are split moe_tp x moe_ep ways.
        per_expert = 3 * hidden * inter
        touched, routed = busiest_rank_load(M_GRID, topk, experts, moe_ep, distribution)
        flops = 2.0 * routed * per_expert / moe_tp
        bytes_moved = touched * per_expert / moe_tp * weight_bytes(precision) + routed * hidden * ACT_BYTES * 2
        line = LogLine(M_GRID, roofline_s(gpu, flops, bytes_moved, gpu.compute_dtype(precision)))
        return line, f"roofline, {distribution} routing"


def routing_probabilities(experts: int, distribution: str) -> np.ndarray:
    """Each expert's share of the routed tokens, most popular first. ``balanced``: equal shares;
    ``power_law_A``: share of the i-th most popular expert proportional to i^-A (the skew
    aiconfigurator profiles its MoE tables under, collector/*/collect_moe.py @095f58a)."""
    if distribution not in ROUTINGS:
        raise ValueError(f"unknown expert routing {distribution!r}; expected one of {', '.join(ROUTINGS)}")
    if distribution == "balanced":
        return np.full(experts, 1.0 / experts)
    alpha = float(distribution.removeprefix("power_law_"))
    w = np.arange(1, experts + 1, dtype=np.float64) ** -alpha
    return w / w.sum()


def busiest_rank_load(tokens, topk: int, experts: int, moe_ep: int, distribution: str) -> tuple[np.ndarray, np.ndarray]:
    """(distinct experts whose weights the busiest expert-parallel rank reads, token-expert pairs it
    computes) for ``tokens`` tokens entering the layer. Experts are placed on ranks without regard to
    popularity (no EPLB), so the busiest rank holds the most popular expert and an average share of
    the rest. Balanced routing spreads the pairs evenly (a batch of b tokens wakes min(E, b x k)
    experts: aiconfigurator's balanced profiles); skewed routing draws each pair independently."""
    tokens = np.asarray(tokens, dtype=np.float64)
    local = experts / moe_ep
    pairs = tokens * topk
    if distribution == "balanced":
        return np.minimum(local, pairs / moe_ep), pairs / moe_ep
    p = routing_probabilities(experts, distribution)
    rest = p[1:].mean() if experts > 1 else 0.0
    shares = np.concatenate([[p[0]], np.full(max(round(local) - 1, 0), rest)])
    touched = np.sum(1.0 - np.power.outer(1.0 - shares, pairs).T, axis=-1) if shares.size else np.zeros_like(pairs)
    return np.minimum(touched, local), pairs * shares.sum()
