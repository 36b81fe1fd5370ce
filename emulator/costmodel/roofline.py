"""Roofline and alpha-beta estimates for kernels and transfers no table covers.

time = max(flops / (peak * eff_c), bytes / (hbm_bw * eff_m)) + launch latency.
eff_m and the launch latency come from aiconfigurator's system files (0.8, 3 us);
eff_c = 0.75 is an assumption close to what large bf16 GEMMs reach in the H100
table (``benchmarks/costmodel_accuracy.py`` prints the roofline's error).
"""

from __future__ import annotations

import numpy as np

from emulator.catalog.gpus import GPU
from emulator.catalog.links import LinkTier

COMPUTE_EFFICIENCY = 0.75


def roofline_s(gpu: GPU, flops, bytes_moved, dtype: str = "bf16"):
    compute = np.asarray(flops, dtype=np.float64) / (gpu.flops(dtype) * COMPUTE_EFFICIENCY)
    memory = np.asarray(bytes_moved, dtype=np.float64) / (gpu.hbm_bw * gpu.mem_efficiency)
    return np.maximum(compute, memory) + gpu.kernel_latency_s


def gemm_roofline_s(gpu: GPU, dtype: str, m, n: int, k: int):
    b = 1 if dtype == "fp8" else 2
    m = np.asarray(m, dtype=np.float64)
    return roofline_s(gpu, 2.0 * m * n * k, b * (m * k + n * k) + 2 * m * n, dtype)


def p2p_s(tier: LinkTier, bytes_moved, endpoints: int = 1):
    """Alpha-beta point to point: latency + bytes / (bandwidth per endpoint × endpoints)."""
    return tier.latency_s + np.asarray(bytes_moved, dtype=np.float64) / (tier.bandwidth * endpoints)


def ring_all_reduce_s(tier: LinkTier, bytes_moved, n: int):
    """Ring all-reduce: 2(n-1) latency hops and 2(n-1)/n of the message over each link."""
    if n <= 1:
        return np.zeros_like(np.asarray(bytes_moved, dtype=np.float64))
    b = np.asarray(bytes_moved, dtype=np.float64)
    return 2 * (n - 1) * tier.latency_s + 2 * (n - 1) / n * b / tier.bandwidth
