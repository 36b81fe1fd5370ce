"""Access to the shipped per-GPU kernel tables (see ``data/NOTICE`` for their source)."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

import numpy as np

from emulator.costmodel.derive import ATTN_FILL_ORDER, KV_DTYPES, MOE_DISTRIBUTIONS, MOE_DTYPES
from emulator.costmodel.grid import LogGrid, LogLine, fill_holes

MS = 1e-3


class GpuTables:
    """Profiled latencies for one GPU, returned in seconds."""

    def __init__(self, store: dict[str, np.ndarray]) -> None:
        self._store = store

    def _axes(self, name: str) -> list[np.ndarray] | None:
        if f"{name}__values" not in self._store:
            return None
        n = self._store[f"{name}__values"].ndim
        return [self._store[f"{name}__axis{i}"] for i in range(n)]

    def has(self, name: str) -> bool:
        return f"{name}__values" in self._store

    # ---- GEMM ------------------------------------------------------------
    @cache  # noqa: B019 - tables live for the process; a handful of dtypes
    def gemm(self, dtype: str) -> LogGrid | None:
        axes = self._axes(f"gemm_{dtype}")
        if axes is None:
            return None
        return LogGrid(axes, self._store[f"gemm_{dtype}__values"].astype(np.float64) * MS)

    def gemm_m_axis(self, dtype: str) -> np.ndarray | None:
        axes = self._axes(f"gemm_{dtype}")
        return None if axes is None else axes[0]

    # ---- attention -----------------------------------------------------------
    def attention_slice(self, table: str, kv_dtype: str, head_dim: int, kv_heads: int, heads: int) -> LogGrid | None:
        """The (batch, length) grid for one head configuration, resolving unmeasured ones.

        head_dim and kv_heads snap to the nearest measured value; a head count that
        was not measured is interpolated in log space between its measured
        neighbours (attention work is proportional to the number of heads).
        """
        axes = self._axes(table)
        if axes is None:
            return None
        values = self._store[f"{table}__values"].astype(np.float64)
        dt = KV_DTYPES["bfloat16" if kv_dtype == "bf16" else "fp8"]
        if dt not in axes[0]:
            return None
        vi = int(np.searchsorted(axes[0], dt))
        hd_i = int(np.argmin(np.abs(np.log(axes[1]) - np.log(head_dim))))
        kv_i = int(np.argmin(np.abs(np.log(axes[2]) - np.log(kv_heads))))
        block = values[vi, hd_i, kv_i]  # (heads, batch, length)
        measured = ~np.isnan(block).all(axis=(1, 2))
        if not measured.any():
            return None
        head_axis = axes[3][measured]
        slices = block[measured]
        scale = 1.0
        if heads in head_axis:
            grid = slices[int(np.searchsorted(head_axis, heads))]
        elif heads < head_axis[0] or heads > head_axis[-1]:
            j = 0 if heads < head_axis[0] else len(head_axis) - 1
            grid, scale = slices[j], heads / head_axis[j]
        else:
            hi = int(np.searchsorted(head_axis, heads))
            lo = hi - 1
            w = (np.log(heads) - np.log(head_axis[lo])) / (np.log(head_axis[hi]) - np.log(head_axis[lo]))
            grid = np.exp((1 - w) * np.log(slices[lo]) + w * np.log(slices[hi]))
        grid = fill_holes(grid, [axes[4], axes[5]], along=tuple(a - 4 for a in ATTN_FILL_ORDER[table]))
        if np.isnan(grid).any():
            return None
        return LogGrid([axes[4], axes[5]], grid * scale * MS)

    # ---- MoE ---------------------------------------------------------------
    def moe_line(
        self,
        kernel: str,
        hidden: int,
        inter: int,
        topk: int,
        experts: int,
        moe_tp: int,
        moe_ep: int,
        distribution: str = "balanced",
    ) -> LogLine | None:
        """Fused-MoE latency by the tokens entering the MoE layer (all attention-DP ranks' tokens:
        the dispatch gathers them), for one kernel precision (the table's ``moe_dtype``)."""
        rows = self._store.get("moe_rows")
        if rows is None or kernel not in MOE_DTYPES:
            return None
        model = np.array(
            [MOE_DTYPES[kernel], hidden, inter, topk, experts, MOE_DISTRIBUTIONS[distribution]], dtype=np.float32
        )
        same = rows[np.all(rows[:, [0, 2, 3, 4, 5, 8]] == model, axis=1)]
        sel = same[(same[:, 6] == moe_tp) & (same[:, 7] == moe_ep)]
        if len(sel) < 2:
            # The same experts split the same number of ways (moe_tp x moe_ep): with balanced routing each
            # GPU reads and multiplies the same bytes whether experts are sliced (TP) or spread (EP); take the
            # measured split closest in moe_tp.
            splits = {(int(r[6]), int(r[7])) for r in same if r[6] * r[7] == moe_tp * moe_ep}
            if not splits:
                return None
            tp, ep = min(splits, key=lambda s: abs(np.log(s[0]) - np.log(moe_tp)))
            sel = same[(same[:, 6] == tp) & (same[:, 7] == ep)]
            if len(sel) < 2:
                return None
        return LogLine(sel[:, 1], sel[:, 9].astype(np.float64) * MS)

    # ---- collectives -----------------------------------------------------------
    def collective_line(self, op: str, num_gpus: int) -> LogLine | None:
        """Latency by message bytes; all_reduce takes the faster of NCCL and vLLM's custom kernel."""
        lines = []
        for table in (f"nccl_{op}", "custom_all_reduce" if op == "all_reduce" else None):
            if table is None or not self.has(table):
                continue
            gpus_axis, bytes_axis = self._axes(table)
            if num_gpus not in gpus_axis:
                continue
            vals = self._store[f"{table}__values"][int(np.searchsorted(gpus_axis, num_gpus))].astype(np.float64)
            ok = ~np.isnan(vals)
            if ok.sum() >= 2:
                lines.append((bytes_axis[ok], vals[ok] * MS))
        if not lines:
            return None
        grid = np.unique(np.concatenate([x for x, _ in lines]))
        best = np.min([LogLine(x, y)(grid) for x, y in lines], axis=0)
        # A message never costs more than a larger one: an engine can pad it, or (as vLLM does by size)
        # pick the algorithm that the larger one uses. The profiles break this where a kernel switches
        # algorithm at a fixed size (B200's custom all-reduce on 8 GPUs: 26 us at 256-512 KiB, 17 us at
        # 1 MiB), which would make a batch of 16-32 tokens slower than one of 64.
        return LogLine(grid, np.minimum.accumulate(best[::-1])[::-1])


@cache
def silicon_gemms(name: str) -> dict[tuple[str, int, int], LogLine]:
    """GEMMs measured on this GPU for infemu (``data/silicon/<gpu>.json``, each with its provenance):
    (dtype, n, k) -> latency line over m, preferred over the profiled table for those shapes."""
    path = resources.files("emulator.costmodel").joinpath("data", "silicon", f"{name}.json")
    if not path.is_file():
        return {}
    data = json.loads(path.read_text("utf-8"))
    return {
        (data["dtype"], int(g["n"]), int(g["k"])): LogLine(np.asarray(g["m"], float), np.asarray(g["ms"], float) * MS)
        for g in data["gemm"]
    }


@cache
def load_tables(name: str) -> GpuTables | None:
    path = resources.files("emulator.costmodel").joinpath("data", f"{name}.npz")
    if not path.is_file():
        return None
    with resources.as_file(path) as real, np.load(real) as npz:
        return GpuTables({k: npz[k] for k in npz.files})
