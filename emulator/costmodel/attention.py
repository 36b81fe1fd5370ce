"""Attention time of one attention rank, by layer kind, for prefill chunks and decode batches.

* Full (global) softmax layers: the GPU's measured prefill / decode attention tables for
  the rank's heads (FlashAttention / FlashInfer, as vLLM runs them), roofline otherwise.
  A prefill chunk of q new tokens after c cached ones is priced at its equivalent causal
  length sqrt(2 x query-key pairs) (= sqrt(q(q + 2c)) without a cap).
* Sliding-window layers (gpt-oss): the same kernels with every query's keys capped at the
  window.
* MLA (DeepSeek, Kimi, GLM): roofline. Prefill runs multi-head attention on decompressed
  keys (qk = nope + rope dims, v = v_head_dim); decode runs absorbed attention over the
  cached latent (kv_lora_rank + rope dims per token), as FlashMLA does. The shipped MLA
  tables are eager per-call timings with a ~0.1 ms floor that a CUDA-graph step does not pay.
* DSA (DeepSeek-V3.2, GLM-5): each query attends to at most ``index_topk`` keys chosen by an
  FP8 indexer that scores every cached key with ``index_heads`` small heads (roofline).
* Linear attention (Qwen3.5's Gated DeltaNet): chunked delta-rule prefill and a recurrent
  decode update that reads and writes a (heads x k_dim x v_dim) fp32 state per sequence
  (roofline; memory-bound in decode).
"""

from __future__ import annotations

import math

import numpy as np

from emulator.catalog.gpus import GPU
from emulator.catalog.models import DTYPE_BYTES, ModelArch
from emulator.costmodel.grid import LogGrid, LogLine
from emulator.costmodel.roofline import roofline_s
from emulator.costmodel.tables import GpuTables

LEN_GRID = np.unique(np.geomspace(1, 262144, 80).round())
ACT_BYTES = DTYPE_BYTES["bf16"]
DELTA_CHUNK = 64  # chunk length of the chunked gated delta rule (fla's chunk_gated_delta_rule)


def causal_pairs(q: float, ctx: float, cap: float | None = None) -> float:
    """Query-key pairs of q new tokens at positions ctx+1..ctx+q, each seeing min(position, cap)."""
    if cap is None or ctx + q <= cap:
        return q * ctx + q * (q + 1) / 2
    below = max(0.0, cap - ctx)  # positions that still see their whole prefix
    pairs_below = below * ctx + below * (below + 1) / 2
    return pairs_below + (q - below) * cap


class AttentionModel:
    """Whole-model attention time of one rank (``tp`` ranks share the heads)."""

    def __init__(self, model: ModelArch, gpu: GPU, tables: GpuTables | None, tp: int, kv_dtype: str) -> None:
        self.m, self.gpu, self.kv_dtype, self.tp = model, gpu, kv_dtype, tp
        self.heads = max(1, model.heads // tp)
        self.kv_heads = 1 if model.is_mla else max(1, model.kv_heads // tp)
        self.sources: dict[str, str] = {}
        ctx = gen = None
        if tables is not None and not model.is_mla and model.softmax_layers:
            ctx = tables.attention_slice("attn_ctx", kv_dtype, model.head_dim, self.kv_heads, self.heads)
            gen = tables.attention_slice("attn_gen", kv_dtype, model.head_dim, self.kv_heads, self.heads)
        self.sources["attention_prefill"] = "table" if ctx is not None else "roofline"
        self.sources["attention_decode"] = "table" if gen is not None else "roofline"
        self._ctx = LogLine(LEN_GRID, ctx(1, LEN_GRID) if ctx is not None else self._prefill_roofline(LEN_GRID))
        self._gen_grid: LogGrid | None = gen
        self._gen_lines: dict[int, LogLine] = {}
        if model.is_dsa:
            self.sources["dsa_indexer"] = "roofline"
        if model.linear_layers:
            self.sources["linear_attention"] = "roofline"

    # ---- roofline forms -----------------------------------------------------------------
    def _prefill_dims(self) -> tuple[int, int, int]:
        m = self.m
        if m.is_mla:  # prefill decompresses K/V: per head qk = nope + rope, v = v_head_dim
            return (
                m.qk_nope_dim + m.qk_rope_dim,
                m.v_head_dim,
                self.heads * (m.qk_nope_dim + m.qk_rope_dim + m.v_head_dim),
            )
        return m.head_dim, m.head_dim, 2 * self.kv_heads * m.head_dim

    def _prefill_roofline(self, isl_eq: np.ndarray) -> np.ndarray:
        qk, v, kv_width = self._prefill_dims()
        flops = 2.0 * self.heads * (qk + v) * isl_eq**2 / 2
        bytes_moved = isl_eq * (self.heads * qk + kv_width) * ACT_BYTES * 2
        return roofline_s(self.gpu, flops, bytes_moved)

    def _decode_roofline(self, batch: int, mean_kv: np.ndarray) -> np.ndarray:
        m = self.m
        kv_bytes = DTYPE_BYTES[self.kv_dtype]
        if m.is_mla:  # absorbed: every head attends over the latent + rope key of each token
            qk, v, width = m.kv_lora_rank + m.qk_rope_dim, m.kv_lora_rank, m.kv_lora_rank + m.qk_rope_dim
        else:
            qk, v, width = m.head_dim, m.head_dim, 2 * self.kv_heads * m.head_dim
        flops = 2.0 * self.heads * (qk + v) * batch * mean_kv
        return roofline_s(self.gpu, flops, batch * mean_kv * width * kv_bytes)

    def _gen_line(self, batch: int) -> LogLine:
        line = self._gen_lines.get(batch)
        if line is None:
            if self._gen_grid is not None:
                line = LogLine(LEN_GRID, self._gen_grid(batch, LEN_GRID))
            else:
                line = LogLine(LEN_GRID, self._decode_roofline(batch, LEN_GRID))
            self._gen_lines[batch] = line
        return line

    # ---- DSA indexer and linear attention ------------------------------------------------
    def _indexer_s(self, scored_pairs, keys_read):
        """FP8 MQA logits of the indexer's heads over the scored keys (plus their fp32 scales)."""
        m = self.m
        flops = 2.0 * m.index_heads * m.index_dim * np.asarray(scored_pairs, dtype=np.float64)
        return roofline_s(self.gpu, flops, np.asarray(keys_read, dtype=np.float64) * (m.index_dim + 4), "fp8")

    def _linear_heads(self) -> int:
        return max(1, self.m.linear_v_heads // self.tp)

    def _linear_prefill_s(self, tokens: float) -> float:
        m = self.m
        heads = self._linear_heads()
        dk, dv = m.linear_k_dim, m.linear_v_dim
        flops = 2.0 * tokens * heads * (3 * dk * dv + DELTA_CHUNK * (dk + dv))
        bytes_moved = tokens * heads * (2 * dk + 2 * dv) * ACT_BYTES + heads * dk * dv * 4 * 2
        return float(roofline_s(self.gpu, flops, bytes_moved))

    def _linear_decode_s(self, batch: int) -> float:
        """Read and write each sequence's fp32 state once; ~4 flops per state element."""
        m = self.m
        elements = self._linear_heads() * m.linear_k_dim * m.linear_v_dim
        return float(roofline_s(self.gpu, 4.0 * batch * elements, 2 * batch * elements * 4))

    # ---- the model's attention -----------------------------------------------------------
    def prefill_s(self, chunks: list[tuple[int, int]]) -> dict[str, float]:
        """Seconds by component for these prefill chunks (q new tokens, c cached), all layers."""
        m = self.m
        out: dict[str, float] = {}
        if not chunks:
            return out
        full = sliding = indexer = 0.0
        for q, c in chunks:
            if m.full_layers:
                cap = m.index_topk if m.is_dsa else None
                full += self._ctx.scalar(math.sqrt(2 * causal_pairs(q, c, cap)))
                if m.is_dsa:  # every key is read once per tile of 128 queries
                    indexer += float(self._indexer_s(causal_pairs(q, c), (c + q) * math.ceil(q / 128)))
            if m.sliding_layers:
                sliding += self._ctx.scalar(math.sqrt(2 * causal_pairs(q, c, m.sliding_window)))
        if m.full_layers:
            out["attention_prefill"] = full * m.full_layers
        if m.sliding_layers:
            out["attention_prefill_sliding"] = sliding * m.sliding_layers
        if m.is_dsa:
            out["dsa_indexer"] = indexer * m.full_layers
        if m.linear_layers:
            out["linear_attention"] = self._linear_prefill_s(sum(q for q, _ in chunks)) * m.linear_layers
        return out

    def decode_terms_s(self, batch: int, mean_kv: float) -> list[float] | None:
        """``decode_s(batch, [mean_kv]).values()`` in plain floats, for one step (the emulation's and
        the simulator's commonest call) without numpy's per-operation cost; None for the models whose
        decode has array-only terms (DSA's indexer, linear attention): ask ``decode_s`` then."""
        m = self.m
        if batch <= 0:
            return []
        if m.is_dsa or m.linear_layers:
            return None
        line = self._gen_line(batch)
        terms = []
        if m.full_layers:
            terms.append(line.scalar(mean_kv) * m.full_layers)
        if m.sliding_layers:
            terms.append(line.scalar(min(mean_kv, m.sliding_window)) * m.sliding_layers)
        return terms

    def decode_s(self, batch: int, mean_kv: np.ndarray) -> dict[str, np.ndarray]:
        """Seconds by component for ``batch`` decoding sequences with these mean KV lengths."""
        m = self.m
        out: dict[str, np.ndarray] = {}
        if batch <= 0:
            return out
        line = self._gen_line(batch)
        if m.full_layers:
            kv = np.minimum(mean_kv, m.index_topk) if m.is_dsa else mean_kv
            out["attention_decode"] = line(kv) * m.full_layers
            if m.is_dsa:
                out["dsa_indexer"] = self._indexer_s(batch * mean_kv, batch * mean_kv) * m.full_layers
        if m.sliding_layers:
            out["attention_decode_sliding"] = line(np.minimum(mean_kv, m.sliding_window)) * m.sliding_layers
        if m.linear_layers:
            out["linear_attention"] = np.full(np.shape(mean_kv), self._linear_decode_s(batch) * m.linear_layers)
        return out
