"""Derive compact cost tables from aiconfigurator-format kernel profiles.

The shipped tables in ``emulator/costmodel/data/<gpu>.npz`` are produced by this
module from ai-dynamo/aiconfigurator's measured kernel timings (Apache-2.0, see
``data/NOTICE``). Users with their own profiles in the same CSV format can derive
tables for a new GPU with ``infemu tables --profiles DIR --out FILE``.

Each table becomes a grid over its size arguments (holes filled by log-log
interpolation along the densest axes); only the kernels vLLM would run are kept
and duplicate measurements keep the fastest kernel.
"""

from __future__ import annotations

import csv
import glob
import gzip
import os
from collections.abc import Callable, Iterable

import numpy as np

from emulator.costmodel.grid import fill_holes, grid_from_rows

KV_DTYPES = {"bfloat16": 0, "fp8": 1}
GEMM_DTYPES = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8_block", "nvfp4": "nvfp4"}
# MoE kernels by the table's moe_dtype: w4a16_mxfp4 = MXFP4 weights on BF16 activations (Marlin /
# Triton on Hopper, TRT-LLM MXFP4xBF16 on Blackwell), w4a8_mxfp4_mxfp8 = MXFP4 x MXFP8 (Blackwell).
MOE_DTYPES = {
    "bfloat16": 0,
    "fp8": 1,
    "fp8_block": 2,
    "nvfp4": 3,
    "int4_wo": 4,
    "w4a16_mxfp4": 5,
    "w4a8_mxfp4_mxfp8": 6,
}
# Expert routing of the measured tokens: balanced, or power-law skew (hot experts).
MOE_DISTRIBUTIONS = {"balanced": 0, "power_law_1.01": 1, "power_law_1.2": 2}


def read_rows(path: str, columns: list[str], keep: Callable[[dict[str, str]], bool] | None = None) -> np.ndarray:
    """Read selected numeric columns of a gzip CSV into an array, one row per kept record."""
    out: list[list[float]] = []
    with gzip.open(path, "rt", newline="") as fh:
        for rec in csv.DictReader(fh):
            if keep is not None and not keep(rec):
                continue
            out.append([float(rec[c]) for c in columns])
    return np.asarray(out, dtype=np.float64).reshape(-1, len(columns))


def _one(profile_dir: str, pattern: str) -> str | None:
    found = sorted(glob.glob(os.path.join(profile_dir, pattern)))
    return found[-1] if found else None


def gemm_rows(path: str, dtype: str) -> np.ndarray:
    """(m, n, k, latency_ms) rows of one GEMM dtype."""
    return read_rows(path, ["m", "n", "k", "latency"], lambda r: r["gemm_dtype"] == dtype)


def gemm_grid(rows: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    axes, grid = grid_from_rows(rows)
    # m is the densest axis (74 points): fill along it first, then n and k.
    return axes, fill_holes(grid, axes, along=(0, 1, 2))


ATTN_CTX_COLS = ["kv_cache_dtype", "head_dim", "num_key_value_heads", "num_heads", "batch_size", "isl"]
ATTN_GEN_COLS = ["kv_cache_dtype", "head_dim", "num_key_value_heads", "num_heads", "batch_size", "step"]


def attention_rows(path: str, columns: list[str]) -> np.ndarray:
    """Full-attention rows (window 0) with the kv dtype encoded as 0=bf16, 1=fp8."""
    out = []
    with gzip.open(path, "rt", newline="") as fh:
        for rec in csv.DictReader(fh):
            if rec.get("window_size", "0") not in ("0", ""):
                continue
            if rec["kv_cache_dtype"] not in KV_DTYPES:
                continue
            vals = [float(KV_DTYPES[rec["kv_cache_dtype"]])]
            vals += [float(rec[c]) for c in columns[1:]]
            vals.append(float(rec["latency"]))
            out.append(vals)
    return np.asarray(out, dtype=np.float64).reshape(-1, len(columns) + 1)


# Fill order per table (axis 4 = batch, 5 = length): the smoother axis first. Measured on
# held-out H100 rows: prefill 3.5% median error batch-first vs 5.7% length-first;
# decode 4.2% length-first vs 5.6% batch-first.
ATTN_FILL_ORDER = {"attn_ctx": (4, 5), "attn_gen": (5, 4)}


def attention_grid(
    rows: np.ndarray, axis_values: list[np.ndarray] | None = None, table: str = "attn_ctx"
) -> tuple[list[np.ndarray], np.ndarray]:
    """Grid over (kv dtype, head_dim, kv_heads, heads, batch, length).

    Holes are filled along batch and length (order: ``ATTN_FILL_ORDER``) inside one
    head configuration only:
    head configurations that were never measured stay empty and are resolved at
    query time from their measured neighbours.
    """
    axes, grid = grid_from_rows(rows, axis_values)
    return axes, fill_holes(grid, axes, along=ATTN_FILL_ORDER[table])


def moe_rows(path: str) -> np.ndarray:
    """(dtype, tokens, hidden, inter, topk, experts, moe_tp, moe_ep, distribution, latency)."""
    out = []
    with gzip.open(path, "rt", newline="") as fh:
        for rec in csv.DictReader(fh):
            if rec["distribution"] not in MOE_DISTRIBUTIONS or rec["moe_dtype"] not in MOE_DTYPES:
                continue
            out.append(
                [float(MOE_DTYPES[rec["moe_dtype"]])]
                + [
                    float(rec[c])
                    for c in (
                        "num_tokens",
                        "hidden_size",
                        "inter_size",
                        "topk",
                        "num_experts",
                        "moe_tp_size",
                        "moe_ep_size",
                    )
                ]
                + [float(MOE_DISTRIBUTIONS[rec["distribution"]]), float(rec["latency"])]
            )
    arr = np.asarray(out, dtype=np.float64).reshape(-1, 10)
    # Keep the fastest kernel per configuration.
    key = {tuple(r[:9]): r[9] for r in arr[np.argsort(-arr[:, 9])]}
    return np.asarray([[*k, v] for k, v in key.items()], dtype=np.float64).reshape(-1, 10)


def comm_rows(path: str, op: str, element_bytes: int, keep: Callable[[dict[str, str]], bool]) -> np.ndarray:
    """(num_gpus, message_bytes, latency_ms); the source counts message_size in elements."""
    rows = read_rows(path, ["num_gpus", "message_size", "latency"], lambda r: r["op_name"] == op and keep(r))
    rows[:, 1] *= element_bytes
    return rows


def _put(store: dict[str, np.ndarray], name: str, axes: Iterable[np.ndarray], grid: np.ndarray) -> None:
    for i, a in enumerate(axes):
        store[f"{name}__axis{i}"] = np.asarray(a, dtype=np.float64)
    store[f"{name}__values"] = grid.astype(np.float32)


def derive_gpu_tables(profile_dir: str) -> dict[str, np.ndarray]:
    """All compact tables for one GPU directory of aiconfigurator profiles."""
    store: dict[str, np.ndarray] = {}
    gemm = _one(profile_dir, "gemm__*gemm_perf.csv.gz")
    if gemm:
        for src, name in GEMM_DTYPES.items():
            rows = gemm_rows(gemm, src)
            if len(rows):
                _put(store, f"gemm_{name}", *gemm_grid(rows))
    ctx = _one(profile_dir, "attention__*context_attention_perf.csv.gz")
    if ctx:
        _put(store, "attn_ctx", *attention_grid(attention_rows(ctx, ATTN_CTX_COLS), table="attn_ctx"))
    gen = _one(profile_dir, "attention__*generation_attention_perf.csv.gz")
    if gen:
        _put(store, "attn_gen", *attention_grid(attention_rows(gen, ATTN_GEN_COLS), table="attn_gen"))
    moe = _one(profile_dir, "moe__*moe_perf.csv.gz")
    if moe:
        store["moe_rows"] = moe_rows(moe).astype(np.float32)
    nccl = _one(profile_dir, "comm__nccl*nccl_perf.csv.gz")
    if nccl:
        for op in ("all_reduce", "all_gather", "alltoall", "reduce_scatter"):
            rows = comm_rows(nccl, op, 2, lambda r: r["nccl_dtype"] == "half")
            if len(rows):
                _put(store, f"nccl_{op}", *grid_from_rows(rows))
    custom = _one(profile_dir, "comm__vllm*custom_allreduce_perf.csv.gz")
    if custom:
        rows = comm_rows(custom, "all_reduce", 2, lambda r: r["backend"] == "vllm_graph")
        if len(rows):
            axes, grid = grid_from_rows(rows)
            _put(store, "custom_all_reduce", axes, fill_holes(grid, axes, along=(1,)))
    return store


def write_tables(profile_dir: str, out_path: str) -> dict[str, np.ndarray]:
    store = derive_gpu_tables(profile_dir)
    if not store:
        raise FileNotFoundError(f"no aiconfigurator-format tables found in {profile_dir}")
    store["source"] = np.asarray(os.path.basename(os.path.normpath(profile_dir)))
    np.savez_compressed(out_path, **store)
    return store
