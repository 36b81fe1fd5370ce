"""How well the shipped tables and the roofline predict measured kernels.

Hold out a random 20% of a profiled table's rows, build the table from the rest
exactly as ``derive`` does, and predict the held-out rows through the same
lookup code the cost model uses. Used by the tests (thresholds) and by
``benchmarks/costmodel_accuracy.py`` (figures for every GPU).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

import numpy as np

from emulator.catalog.gpus import GPU
from emulator.costmodel.derive import (
    ATTN_CTX_COLS,
    ATTN_GEN_COLS,
    attention_grid,
    attention_rows,
    comm_rows,
    gemm_grid,
    gemm_rows,
    moe_rows,
)
from emulator.costmodel.grid import LogGrid, LogLine
from emulator.costmodel.roofline import gemm_roofline_s
from emulator.costmodel.tables import GpuTables


@dataclass(frozen=True)
class ErrorStats:
    rows: int
    median: float
    p90: float

    @classmethod
    def of(cls, pred: np.ndarray, truth: np.ndarray) -> ErrorStats:
        ok = np.isfinite(pred)
        rel = np.abs(pred[ok] - truth[ok]) / truth[ok]
        if not len(rel):
            return cls(0, float("nan"), float("nan"))
        return cls(int(ok.sum()), float(np.median(rel)), float(np.percentile(rel, 90)))


def _split(rows: np.ndarray, seed: int, frac: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    mask = np.random.default_rng(seed).random(len(rows)) < frac
    return rows[~mask], rows[mask]


def _find(profile_dir: str, pattern: str) -> str | None:
    found = sorted(glob.glob(os.path.join(profile_dir, pattern)))
    return found[-1] if found else None


def held_out_gemm(profile_dir: str, dtype: str = "bfloat16", seed: int = 0) -> ErrorStats | None:
    path = _find(profile_dir, "gemm__*gemm_perf.csv.gz")
    rows = gemm_rows(path, dtype) if path else np.zeros((0, 4))
    if len(rows) == 0:
        return None
    train, test = _split(rows, seed)
    grid = LogGrid(*gemm_grid(train))
    return ErrorStats.of(grid(test[:, 0], test[:, 1], test[:, 2]), test[:, 3])


def held_out_attention(profile_dir: str, table: str, seed: int = 0) -> ErrorStats | None:
    """``table`` is attn_ctx (prefill) or attn_gen (decode)."""
    pattern, cols = (
        ("attention__*context_attention_perf.csv.gz", ATTN_CTX_COLS)
        if table == "attn_ctx"
        else ("attention__*generation_attention_perf.csv.gz", ATTN_GEN_COLS)
    )
    path = _find(profile_dir, pattern)
    if path is None:
        return None
    rows = attention_rows(path, cols)
    best: dict[tuple, float] = {}
    for r in rows:  # duplicate measurements (two kernels) keep the fastest, as the table does
        key = tuple(r[:-1])
        best[key] = min(best.get(key, np.inf), r[-1])
    rows = np.array([[*k, v] for k, v in best.items()])
    axes_all = [np.unique(rows[:, i]) for i in range(rows.shape[1] - 1)]
    train, test = _split(rows, seed)
    axes, grid = attention_grid(train, axes_all, table)
    store = {f"{table}__axis{i}": a for i, a in enumerate(axes)}
    store[f"{table}__values"] = grid
    tables = GpuTables(store)
    pred = np.full(len(test), np.nan)
    for key in {tuple(r[:4]) for r in test}:
        sel = np.all(test[:, :4] == key, axis=1)
        dt, hd, kv, heads = key
        sl = tables.attention_slice(table, "bf16" if dt == 0 else "fp8", int(hd), int(kv), int(heads))
        if sl is not None:
            pred[sel] = sl(test[sel, 4], test[sel, 5]) * 1e3
    return ErrorStats.of(pred, test[:, -1])


def held_out_all_reduce(profile_dir: str, seed: int = 0) -> ErrorStats | None:
    path = _find(profile_dir, "comm__nccl*nccl_perf.csv.gz")
    if path is None:
        return None
    rows = comm_rows(path, "all_reduce", 2, lambda r: r["nccl_dtype"] == "half")
    train, test = _split(rows, seed)
    pred = np.full(len(test), np.nan)
    for n in np.unique(test[:, 0]):
        tr = train[train[:, 0] == n]
        sel = test[:, 0] == n
        if len(tr) >= 2:
            pred[sel] = LogLine(tr[:, 1], tr[:, 2])(test[sel, 1])
    return ErrorStats.of(pred, test[:, 2])


def held_out_moe(profile_dir: str, seed: int = 0) -> ErrorStats | None:
    path = _find(profile_dir, "moe__*moe_perf.csv.gz")
    if path is None:
        return None
    rows = moe_rows(path)
    train, test = _split(rows, seed)
    pred = np.full(len(test), np.nan)
    cols = [0, 2, 3, 4, 5, 6, 7, 8]  # everything but the token count and the latency
    keys = {tuple(r[cols]) for r in test}
    for key in keys:
        k = np.array(key)
        tr = train[np.all(train[:, cols] == k, axis=1)]
        sel = np.all(test[:, cols] == k, axis=1)
        if len(tr) >= 2:
            pred[sel] = LogLine(tr[:, 1], tr[:, 9])(test[sel, 1])
    return ErrorStats.of(pred, test[:, 9])


def roofline_gemm_error(profile_dir: str, gpu: GPU, dtype: str = "bfloat16") -> ErrorStats | None:
    """The roofline fallback against every measured GEMM (what a GPU without tables gets)."""
    path = _find(profile_dir, "gemm__*gemm_perf.csv.gz")
    rows = gemm_rows(path, dtype) if path else np.zeros((0, 4))
    if len(rows) == 0:
        return None
    short = "fp8" if dtype == "fp8" else "bf16"
    pred = np.array([gemm_roofline_s(gpu, short, m, int(n), int(k)) for m, n, k, _ in rows]) * 1e3
    return ErrorStats.of(pred, rows[:, 3])
