"""Iteration time of one serving instance (TP × PP, optional EP) for a batch shape.

Every operator comes from the GPU's profiled table when one covers it and from
the roofline otherwise; each is precomputed at construction onto a fast 1-D
log-log line over its size argument, so a step costs a handful of ``np.interp``
calls (Vidur's "fit once, answer by lookup", STYLE principle 5).

Per layer: QKV / O projections, attention (prefill chunks by their equivalent
causal length, decode by batch and mean KV length), MLP or MoE experts, norms
and elementwise work, two TP all-reduces, EP dispatch + combine for MoE layers.
Once per step: the LM head on the sampled positions, PP send/recv between
stages, and a fixed per-step overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emulator.catalog.gpus import GPU
from emulator.catalog.links import LinkTier
from emulator.catalog.models import DTYPE_BYTES, ModelArch
from emulator.costmodel.grid import LogGrid, LogLine
from emulator.costmodel.interface import BatchShape, StepTime
from emulator.costmodel.roofline import gemm_roofline_s, p2p_s, ring_all_reduce_s, roofline_s
from emulator.costmodel.tables import GpuTables, load_tables

M_GRID = np.unique(np.concatenate([np.arange(1, 17), np.geomspace(16, 262144, 60).round()]))
LEN_GRID = np.unique(np.geomspace(1, 262144, 80).round())
ACT_BYTES = DTYPE_BYTES["bf16"]  # activations stay in bf16 in vLLM, also with fp8 weights


@dataclass(frozen=True)
class InstanceConfig:
    model: ModelArch
    gpu: GPU
    dtype: str = "bf16"
    kv_dtype: str = "bf16"
    tp: int = 1
    pp: int = 1
    ep: int = 1
    intra_tier: LinkTier | None = None  # tier inside the instance (TP/PP/EP traffic)
    step_overhead_s: float = 250e-6
    use_tables: bool = True


class InstanceCostModel:
    """The ``CostModel`` of one instance configuration."""

    def __init__(self, cfg: InstanceConfig) -> None:
        self.cfg = cfg
        m, t = cfg.model, cfg.tp
        self.tables: GpuTables | None = load_tables(cfg.gpu.table) if cfg.use_tables and cfg.gpu.table else None
        self.sources: dict[str, str] = {}
        self.heads_local = m.heads // t
        self.kv_local = 1 if m.is_mla else max(1, m.kv_heads // t)
        self._moe_layers = m.moe_layers
        self._dense_layers = m.layers - m.moe_layers
        self._linear_ops = self._build_linear_ops()
        self._moe = self._build_moe() if m.is_moe else None
        self._allreduce = self._build_collective("all_reduce", t)
        self._alltoall = self._build_collective("alltoall", cfg.ep) if cfg.ep > 1 else None
        self._ctx_attn, self._gen_attn = self._build_attention()
        self._gen_lines: dict[int, LogLine] = {}

    # ---- construction ------------------------------------------------------
    def _gemm_line(self, name: str, n: int, k: int) -> LogLine:
        grid = self.tables.gemm(self.cfg.dtype) if self.tables else None
        if grid is not None:
            self.sources[name] = "table"
            return LogLine(M_GRID, grid(M_GRID, n, k))
        self.sources[name] = "roofline"
        return LogLine(M_GRID, gemm_roofline_s(self.cfg.gpu, self.cfg.dtype, M_GRID, n, k))

    def _build_linear_ops(self) -> list[tuple[str, LogLine, float, str]]:
        """(name, line over tokens, multiplier, which m it takes: 'tokens' or 'logits')."""
        m, t = self.cfg.model, self.cfg.tp
        ops: list[tuple[str, LogLine, float, str]] = []
        if m.is_mla:
            qk = m.qk_nope_dim + m.qk_rope_dim
            if m.q_lora_rank:
                ops.append(("mla_q_a", self._gemm_line("mla_q_a", m.q_lora_rank, m.hidden), m.layers, "tokens"))
                ops.append(
                    ("mla_q_b", self._gemm_line("mla_q_b", self.heads_local * qk, m.q_lora_rank), m.layers, "tokens")
                )
            else:
                ops.append(("mla_q", self._gemm_line("mla_q", self.heads_local * qk, m.hidden), m.layers, "tokens"))
            ops.append(
                ("mla_kv_a", self._gemm_line("mla_kv_a", m.kv_lora_rank + m.qk_rope_dim, m.hidden), m.layers, "tokens")
            )
            kv_b_n = self.heads_local * (m.qk_nope_dim + m.v_head_dim)
            ops.append(("mla_kv_b", self._gemm_line("mla_kv_b", kv_b_n, m.kv_lora_rank), m.layers, "tokens"))
            ops.append(
                ("attn_out", self._gemm_line("attn_out", m.hidden, self.heads_local * m.v_head_dim), m.layers, "tokens")
            )
        else:
            qkv_n = (self.heads_local + 2 * self.kv_local) * m.head_dim
            ops.append(("qkv_proj", self._gemm_line("qkv_proj", qkv_n, m.hidden), m.layers, "tokens"))
            ops.append(
                ("attn_out", self._gemm_line("attn_out", m.hidden, self.heads_local * m.head_dim), m.layers, "tokens")
            )
        if self._dense_layers:
            inter = m.intermediate // t
            ops.append(
                ("mlp_gate_up", self._gemm_line("mlp_gate_up", 2 * inter, m.hidden), self._dense_layers, "tokens")
            )
            ops.append(("mlp_down", self._gemm_line("mlp_down", m.hidden, inter), self._dense_layers, "tokens"))
        if self._moe_layers and m.shared_experts:
            inter = m.shared_intermediate * m.shared_experts // t
            ops.append(
                (
                    "shared_expert_gate_up",
                    self._gemm_line("shared_expert", 2 * inter, m.hidden),
                    self._moe_layers,
                    "tokens",
                )
            )
            ops.append(
                ("shared_expert_down", self._gemm_line("shared_expert", m.hidden, inter), self._moe_layers, "tokens")
            )
        ops.append(("lm_head", self._gemm_line("lm_head", m.vocab // t, m.hidden), 1, "logits"))
        return ops

    def _build_moe(self) -> LogLine:
        m, c = self.cfg.model, self.cfg
        moe_tp, moe_ep = c.tp // c.ep, c.ep
        line = (
            self.tables.moe_line(c.dtype, m.hidden, m.moe_intermediate, m.top_k, m.num_experts, moe_tp, moe_ep)
            if self.tables
            else None
        )
        if line is not None:
            self.sources["moe_experts"] = "table"
            return line
        self.sources["moe_experts"] = "roofline"
        # Per GPU: each token visits top_k experts; experts are sharded over tp (moe_tp × moe_ep) GPUs.
        wbytes = DTYPE_BYTES[c.dtype]
        per_expert = 3 * m.hidden * m.moe_intermediate
        flops = 2.0 * M_GRID * m.top_k * per_expert / c.tp
        touched = np.minimum(m.num_experts, M_GRID * m.top_k)  # distinct experts whose weights are read
        bytes_moved = touched * per_expert * wbytes / c.tp + M_GRID * m.hidden * ACT_BYTES * 2 * m.top_k
        return LogLine(M_GRID, roofline_s(c.gpu, flops, bytes_moved, c.dtype))

    def _build_collective(self, op: str, n: int) -> LogLine | None:
        if n <= 1:
            return None
        tier = self.cfg.intra_tier
        sizes = np.geomspace(256, 2**31, 64)
        line = self.tables.collective_line(op, n) if self.tables and (tier is None or tier.kind == "scale-up") else None
        if line is not None:
            self.sources[op] = "table"
            return line
        self.sources[op] = "alpha-beta"
        from emulator.catalog.links import get_tier

        tier = tier or get_tier(self.cfg.gpu.default_scale_up_tier)
        if op == "all_reduce":
            return LogLine(sizes, ring_all_reduce_s(tier, sizes, n))
        return LogLine(sizes, tier.latency_s * (n - 1) + sizes * (n - 1) / n / tier.bandwidth)

    def _build_attention(self) -> tuple[LogLine, LogGrid | None]:
        """Prefill: a line over equivalent causal length at batch 1. Decode: a (batch, kv length) grid."""
        m, c = self.cfg.model, self.cfg
        ctx = gen = None
        if self.tables and not m.is_mla:
            ctx = self.tables.attention_slice("attn_ctx", c.kv_dtype, m.head_dim, self.kv_local, self.heads_local)
            gen = self.tables.attention_slice("attn_gen", c.kv_dtype, m.head_dim, self.kv_local, self.heads_local)
        if ctx is not None:
            self.sources["attention_prefill"] = "table"
            ctx_line = LogLine(LEN_GRID, ctx(1, LEN_GRID))
        else:
            self.sources["attention_prefill"] = "roofline"
            ctx_line = LogLine(LEN_GRID, self._attention_prefill_roofline(LEN_GRID))
        self.sources["attention_decode"] = "table" if gen is not None else "roofline"
        return ctx_line, gen

    def _qk_v_dims(self) -> tuple[int, int, int]:
        m = self.cfg.model
        if m.is_mla:  # absorbed MLA attends in the latent space
            return m.kv_lora_rank + m.qk_rope_dim, m.kv_lora_rank, m.kv_lora_rank + m.qk_rope_dim
        return m.head_dim, m.head_dim, 2 * self.kv_local * m.head_dim

    def _attention_prefill_roofline(self, isl_eq: np.ndarray) -> np.ndarray:
        qk, v, kv_width = self._qk_v_dims()
        flops = 2.0 * self.heads_local * (qk + v) * isl_eq**2 / 2
        bytes_moved = isl_eq * (self.heads_local * qk + kv_width) * ACT_BYTES * 2
        return roofline_s(self.cfg.gpu, flops, bytes_moved)

    def _attention_decode_roofline(self, batch: int, mean_kv: np.ndarray) -> np.ndarray:
        qk, v, kv_width = self._qk_v_dims()
        kv_bytes = DTYPE_BYTES[self.cfg.kv_dtype]
        flops = 2.0 * self.heads_local * (qk + v) * batch * mean_kv
        bytes_moved = batch * mean_kv * kv_width * kv_bytes
        return roofline_s(self.cfg.gpu, flops, bytes_moved)

    def _gen_line(self, batch: int) -> LogLine:
        line = self._gen_lines.get(batch)
        if line is None:
            if self._gen_attn is not None:
                line = LogLine(LEN_GRID, self._gen_attn(batch, LEN_GRID))
            else:
                line = LogLine(LEN_GRID, self._attention_decode_roofline(batch, LEN_GRID))
            self._gen_lines[batch] = line
        return line

    # ---- evaluation ----------------------------------------------------------
    def _ops(self, shape: BatchShape, decode_mean_kv: np.ndarray) -> dict[str, np.ndarray | float]:
        """Seconds per operator for the whole model; decode attention is an array over steps."""
        m, c = self.cfg.model, self.cfg
        tokens = shape.num_tokens
        out: dict[str, np.ndarray | float] = {}
        if tokens == 0:
            return out
        for name, line, mult, arg in self._linear_ops:
            x = tokens if arg == "tokens" else max(shape.logits, 1)
            out[name] = out.get(name, 0.0) + line.scalar(x) * mult
        if shape.prefill_chunks:
            q = np.array([p[0] for p in shape.prefill_chunks], dtype=np.float64)
            ctx = np.array([p[1] for p in shape.prefill_chunks], dtype=np.float64)
            isl_eq = np.sqrt(q * (q + 2.0 * ctx))
            out["attention_prefill"] = float(self._ctx_attn(isl_eq).sum()) * m.layers
        if shape.num_decode:
            out["attention_decode"] = self._gen_line(shape.num_decode)(decode_mean_kv) * m.layers
        # norms, rotary, activation, residual adds: memory bound
        inter_local = (m.intermediate if not m.is_moe else m.moe_intermediate * m.top_k) / c.tp
        ew_bytes = tokens * (10 * m.hidden + 3 * inter_local) * ACT_BYTES
        out["norm_elementwise"] = (ew_bytes / (c.gpu.hbm_bw * c.gpu.mem_efficiency) + c.gpu.kernel_latency_s) * m.layers
        if self._moe is not None:
            out["moe_experts"] = self._moe.scalar(tokens) * self._moe_layers
            if self._alltoall is not None:
                msg = tokens * m.top_k * m.hidden * ACT_BYTES
                out["ep_dispatch_combine"] = 2.0 * self._alltoall.scalar(msg) * self._moe_layers
        if self._allreduce is not None:
            out["tp_all_reduce"] = 2.0 * self._allreduce.scalar(tokens * m.hidden * ACT_BYTES) * m.layers
        return out

    def _pp_send_recv_s(self, shape: BatchShape) -> float:
        c = self.cfg
        if c.pp <= 1:
            return 0.0
        from emulator.catalog.links import get_tier

        tier = c.intra_tier or get_tier(c.gpu.default_scale_up_tier)
        return float(p2p_s(tier, shape.num_tokens * c.model.hidden * ACT_BYTES))

    def breakdown(self, shape: BatchShape) -> dict[str, float]:
        mean_kv = np.array([shape.decode_kv_sum / shape.num_decode]) if shape.num_decode else np.zeros(1)
        ops = {k: float(np.asarray(v).ravel()[0]) for k, v in self._ops(shape, mean_kv).items()}
        if self.cfg.pp > 1 and shape.num_tokens:
            ops["pp_send_recv"] = (self.cfg.pp - 1) * self._pp_send_recv_s(shape)
        if shape.num_tokens:
            ops["step_overhead"] = self.cfg.step_overhead_s
        return ops

    def _total(self, shape: BatchShape, mean_kv: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ops = self._ops(shape, mean_kv)
        compute = np.zeros_like(mean_kv)
        for v in ops.values():
            compute = compute + v
        p2p = (self.cfg.pp - 1) * self._pp_send_recv_s(shape)
        total = compute + p2p + self.cfg.step_overhead_s
        interval = compute / self.cfg.pp + self.cfg.step_overhead_s
        return total, interval

    def step_time(self, shape: BatchShape) -> StepTime:
        if shape.num_tokens == 0:
            return StepTime(0.0, 0.0)
        mean_kv = np.array([shape.decode_kv_sum / shape.num_decode]) if shape.num_decode else np.zeros(1)
        total, interval = self._total(shape, mean_kv)
        return StepTime(float(total[0]), float(interval[0]))

    def decode_stretch_s(self, num_decode: int, kv_sum_start: int, steps: int) -> np.ndarray:
        kv_sums = kv_sum_start + np.arange(steps, dtype=np.int64) * num_decode
        mean_kv = kv_sums / num_decode
        shape = BatchShape(num_decode=num_decode, decode_kv_sum=kv_sum_start)
        total, _ = self._total(shape, mean_kv)
        return total

    # ---- helpers for reports and transfers --------------------------------------
    def kv_transfer_bytes(self, tokens: int) -> int:
        return tokens * self.cfg.model.kv_bytes_per_token(self.cfg.kv_dtype)


_CACHE: dict[InstanceConfig, InstanceCostModel] = {}


def instance_cost_model(cfg: InstanceConfig) -> InstanceCostModel:
    """Instances of one pool share one precomputed model."""
    model = _CACHE.get(cfg)
    if model is None:
        model = _CACHE[cfg] = InstanceCostModel(cfg)
    return model
