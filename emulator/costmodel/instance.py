"""GPU kernel time of one engine step of one serving instance (TP x PP, EP, attention DP).

Every operator comes from the GPU's profiled table when one covers it and from the
roofline otherwise; each is precomputed at construction onto a fast 1-D log-log line over
its size argument, so a step costs a handful of ``np.interp`` calls (Vidur's "fit once,
answer by lookup", STYLE principle 5). Host-side work (scheduling, launches, sampling) is
not here: ``emulator.costmodel.step`` adds it per engine.

Per layer: attention projections (QKV/O, MLA, linear-attention) at the checkpoint's
attention precision; attention by layer kind (``emulator.costmodel.attention``); dense MLP
or routed + shared experts at their precisions; norms and elementwise work; collectives.
Once per step: the LM head on the sampled positions (BF16), PP send/recv between stages,
and an optional fixed extra.

Attention data parallelism (``dp`` > 1, MoE models): dp ranks of ``tp`` GPUs each run
attention, projections and dense layers on their own requests; the step waits for the
busiest rank (prefill chunks go to the least-loaded rank, decodes are spread evenly). The
routed experts see every rank's tokens (split ``moe_tp`` x ``ep`` over the tp x dp GPUs) and
their dispatch and combine are two all-to-alls over those GPUs with the bytes per token the model
implies (``ep_bytes_per_token``: hidden size, top-k, dispatch precision). With dp = 1 and EP inside TP the tokens are
already replicated and the usual TP all-reduce combines the experts' outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from emulator.catalog.gpus import GPU
from emulator.catalog.links import LinkTier, get_tier
from emulator.catalog.models import DTYPE_BYTES, ModelArch
from emulator.catalog.quant import Quantization, override
from emulator.costmodel.attention import AttentionModel
from emulator.costmodel.collectives import Collectives
from emulator.costmodel.grid import LogLine
from emulator.costmodel.interface import BatchShape, StepTime
from emulator.costmodel.linear import DEFAULT_ROUTING, LinearOps
from emulator.costmodel.roofline import p2p_s
from emulator.costmodel.tables import load_tables

ACT_BYTES = DTYPE_BYTES["bf16"]  # activations stay in bf16, also with quantized weights


@dataclass(frozen=True)
class InstanceConfig:
    model: ModelArch
    gpu: GPU
    dtype: str | None = None  # override every dense precision (what-if studies, tests)
    kv_dtype: str | None = None  # override the KV-cache precision
    tp: int = 1
    pp: int = 1
    ep: int = 1
    dp: int = 1
    intra_tier: LinkTier | None = None  # tier inside a scale-up domain (TP/EP/PP traffic)
    scale_out_tier: LinkTier | None = None  # tier between domains, for groups wider than one
    domain_size: int = 8
    step_overhead_s: float = 0.0
    use_tables: bool = True
    moe_distribution: str = DEFAULT_ROUTING  # expert routing (linear.ROUTINGS)
    part: str = "all"  # "attention": an AFD attention rank, whose routed and shared experts run elsewhere

    @property
    def quant(self) -> Quantization:
        return override(self.model.quant, gemm=self.dtype, moe=None, kv_cache=self.kv_dtype)


@dataclass(frozen=True)
class _Op:
    name: str
    line: LogLine
    per_step: float  # how many times per step (layers)
    scope: str  # "rank" tokens, "logits" of a rank, "moe" tokens of all ranks


class InstanceCostModel:
    """The kernel part of the ``CostModel`` of one instance configuration."""

    def __init__(self, cfg: InstanceConfig) -> None:
        self.cfg = cfg
        m, gpu = cfg.model, cfg.gpu
        q = cfg.quant
        self.quant = q
        self.tables = load_tables(gpu.table) if cfg.use_tables and gpu.table else None
        self.sources: dict[str, str] = {}
        self.linear = LinearOps(gpu, self.tables)
        self.attention = AttentionModel(m, gpu, self.tables, cfg.tp, q.kv_cache)
        self.sources.update(self.attention.sources)
        up = cfg.intra_tier or get_tier(gpu.default_scale_up_tier)
        out = cfg.scale_out_tier or get_tier(gpu.default_scale_out_tier)
        self._p2p_tier = up
        self.collectives = Collectives(self.tables if up.kind == "scale-up" else None, up, out, cfg.domain_size)
        self._ops = self._build_ops()
        self._dense_cache: dict[tuple[int, int], dict[str, float]] = {}
        self._totals_cache: dict[tuple[int, int], float] = {}
        self._tp_ar, src = self.collectives.all_reduce(cfg.tp)
        if self._tp_ar is not None:
            self.sources["tp_all_reduce"] = src
        self._ep_a2a = None
        if cfg.dp > 1 and m.is_moe and cfg.part != "attention":
            self._ep_a2a, src = self.collectives.all_to_all(cfg.tp * cfg.dp)
            if self._ep_a2a is not None:
                self.sources["ep_dispatch_combine"] = (
                    f"{src} all-to-all x2: {self.ep_bytes_per_token('dispatch'):.0f} B/token out (dispatch), "
                    f"{self.ep_bytes_per_token('combine'):.0f} B/token back (combine)"
                )

    # ---- construction ------------------------------------------------------------
    def _gemm(self, name: str, precision: str, n: int, k: int, per_step: float, scope: str = "rank") -> _Op:
        line, src = self.linear.gemm(precision, n, k)
        self.sources[name] = src
        return _Op(name, line, per_step, scope)

    def _build_ops(self) -> list[_Op]:
        m, c, q = self.cfg.model, self.cfg, self.quant
        t = c.tp
        heads = self.attention.heads
        kv = self.attention.kv_heads
        ops: list[_Op] = []
        soft = m.softmax_layers
        if m.is_mla and soft:
            qk = m.qk_nope_dim + m.qk_rope_dim
            if m.q_lora_rank:
                ops.append(self._gemm("mla_q_a", q.attention, m.q_lora_rank, m.hidden, soft))
                ops.append(self._gemm("mla_q_b", q.attention, heads * qk, m.q_lora_rank, soft))
            else:
                ops.append(self._gemm("mla_q", q.attention, heads * qk, m.hidden, soft))
            ops.append(self._gemm("mla_kv_a", q.attention, m.kv_lora_rank + m.qk_rope_dim, m.hidden, soft))
            ops.append(
                self._gemm("mla_kv_b", q.attention, heads * (m.qk_nope_dim + m.v_head_dim), m.kv_lora_rank, soft)
            )
            ops.append(self._gemm("attn_out", q.attention, m.hidden, heads * m.v_head_dim, soft))
            if m.is_dsa:
                q_src = m.q_lora_rank or m.hidden
                ops.append(
                    self._gemm("dsa_indexer_proj", "bf16", m.index_heads * m.index_dim + m.index_dim, q_src, soft)
                )
        elif soft:
            q_width = heads * m.head_dim * (2 if m.attn_output_gate else 1)
            ops.append(self._gemm("qkv_proj", q.attention, q_width + 2 * kv * m.head_dim, m.hidden, soft))
            ops.append(self._gemm("attn_out", q.attention, m.hidden, heads * m.head_dim, soft))
        if m.linear_layers:
            kw = m.linear_k_heads * m.linear_k_dim // t
            vw = m.linear_v_heads * m.linear_v_dim // t
            ops.append(
                self._gemm(
                    "linear_in_proj",
                    q.attention,
                    2 * kw + 2 * vw + 2 * m.linear_v_heads // t,
                    m.hidden,
                    m.linear_layers,
                )
            )
            ops.append(self._gemm("linear_out_proj", q.attention, m.hidden, vw, m.linear_layers))
        dense_layers = m.layers - m.moe_layers
        if dense_layers:
            inter = m.intermediate // t
            ops.append(self._gemm("mlp_gate_up", q.gemm, 2 * inter, m.hidden, dense_layers))
            ops.append(self._gemm("mlp_down", q.gemm, m.hidden, inter, dense_layers))
        if c.part == "attention":  # AFD: experts on the FFN side (emulator.costmodel.afd); routing stays here
            if m.moe_layers:
                ops.append(self._gemm("moe_router", "bf16", m.num_experts, m.hidden, m.moe_layers))
            ops.append(self._gemm("lm_head", "bf16", m.vocab // t, m.hidden, 1, "logits"))
            return ops
        if m.moe_layers and m.shared_experts:
            inter = m.shared_intermediate * m.shared_experts // t
            ops.append(self._gemm("shared_expert_gate_up", q.gemm, 2 * inter, m.hidden, m.moe_layers))
            ops.append(self._gemm("shared_expert_down", q.gemm, m.hidden, inter, m.moe_layers))
        if m.moe_layers:
            moe_gpus = c.tp * c.dp
            line, src = self.linear.moe(
                q.moe, m.hidden, m.moe_intermediate, m.top_k, m.num_experts, moe_gpus // c.ep, c.ep, c.moe_distribution
            )
            self.sources["moe_experts"] = src
            ops.append(_Op("moe_experts", line, m.moe_layers, "moe"))
            ops.append(self._gemm("moe_router", "bf16", m.num_experts, m.hidden, m.moe_layers))
        ops.append(self._gemm("lm_head", "bf16", m.vocab // t, m.hidden, 1, "logits"))
        return ops

    def eager_kernels(self) -> float:
        """Kernels one step launches when it runs eagerly: what its host-side launch floor scales with.

        Counted from the model's structure: one per GEMM built above (a MoE layer's grouped expert GEMMs
        count as two), and per layer its two RMSNorms; rotary, KV-cache write and attention (softmax
        layers); causal convolution, the six kernels of the chunked delta rule and the gated norm (linear
        attention layers); the activation (dense MLP, shared experts); top-k, token sort, activation and
        combine (routed experts); the two all-reduces under TP. An approximation of what vLLM's and
        SGLang's layer code launches (their fusions vary by version): the launch cost per kernel is the
        fitted ``eager_launch_us_per_kernel``, so the count only sets how the floor scales across models.
        """
        m, c = self.cfg.model, self.cfg
        experts_here = m.moe_layers if c.part != "attention" else 0
        n = sum(op.per_step for op in self._ops) + experts_here  # the second grouped expert GEMM
        n += 2 * m.layers + 3 * m.softmax_layers + 8 * m.linear_layers
        n += (m.layers - m.moe_layers) + 4 * experts_here
        if m.shared_experts and c.part != "attention":
            n += m.moe_layers
        if c.tp > 1:
            n += 2 * m.layers
        return float(n)

    # ---- attention-DP ranks --------------------------------------------------------------
    def _ranks(self, shape: BatchShape) -> list[tuple[list[tuple[int, int]], int]]:
        """(prefill chunks, decodes) per attention-DP rank: chunks to the least-loaded rank,
        decodes spread evenly."""
        dp = self.cfg.dp
        if dp <= 1:
            return [(list(shape.prefill_chunks), shape.num_decode)]
        base, extra = divmod(shape.num_decode, dp)
        ranks = [([], base + (1 if r < extra else 0)) for r in range(dp)]
        load = [float(d) for _, d in ranks]
        for chunk in sorted(shape.prefill_chunks, key=lambda ch: -ch[0]):
            r = int(np.argmin(load))
            ranks[r][0].append(chunk)
            load[r] += chunk[0]
        return ranks

    # ---- evaluation ----------------------------------------------------------------------
    def _rank_ops(
        self, chunks: list[tuple[int, int]], num_decode: int, mean_kv: np.ndarray, tokens: int, logits: int
    ) -> dict[str, np.ndarray | float]:
        if tokens <= 0:
            return {}
        out: dict[str, np.ndarray | float] = dict(self._dense_ops(tokens, logits))
        out.update(self.attention.prefill_s(chunks))
        for name, v in self.attention.decode_s(num_decode, mean_kv).items():
            out[name] = out.get(name, 0.0) + v
        return out

    def _dense_ops(self, tokens: int, logits: int) -> dict[str, float]:
        """The terms that depend on the token and logit counts only (GEMMs, element-wise work, the TP
        all-reduce), memoised: a run asks for the same batch sizes step after step."""
        key = (tokens, logits)
        cached = self._dense_cache.get(key)
        if cached is not None:
            return cached
        m, c = self.cfg.model, self.cfg
        out: dict[str, float] = {}
        for op in self._ops:
            if op.scope == "moe":
                continue
            x = tokens if op.scope == "rank" else max(logits, 1)
            out[op.name] = op.line.scalar(x) * op.per_step
        # norms, rotary, activation, residual adds: memory bound
        inter_local = (m.intermediate if not m.is_moe else m.moe_intermediate * m.top_k) / c.tp
        if c.part == "attention" and m.is_moe:  # the experts' activations are computed on the FFN side
            inter_local = 0.0
        ew_bytes = tokens * (10 * m.hidden + 3 * inter_local) * ACT_BYTES
        gpu = c.gpu
        out["norm_elementwise"] = (ew_bytes / (gpu.hbm_bw * gpu.mem_efficiency) + gpu.kernel_latency_s) * m.layers
        if self._tp_ar is not None:
            # with attention DP (or AFD) the experts' combine replaces the MoE layers' second all-reduce
            per_layer = 1 if ((c.dp > 1 or c.part == "attention") and m.is_moe) else 2
            reductions = m.layers * per_layer + ((m.layers - m.moe_layers) if per_layer == 1 else 0)
            out["tp_all_reduce"] = self._tp_ar.scalar(tokens * m.hidden * ACT_BYTES) * reductions
        return _remember(self._dense_cache, key, out)

    def _model_ops(self, shape: BatchShape, mean_kv: np.ndarray, gemm_tokens: int | None = None) -> dict:
        """Seconds per operator for the whole model; decode-dependent terms are arrays over steps.

        ``gemm_tokens`` (a CUDA-graph padded batch) replaces the token count of the GEMMs and
        collectives; attention always sees the real sequences.
        """
        m = self.cfg.model
        tokens = shape.num_tokens
        if tokens == 0:
            return {}
        ranks = self._ranks(shape)
        pad = (gemm_tokens or tokens) - tokens
        per_rank: list[dict] = []
        for i, (chunks, decodes) in enumerate(ranks):
            rank_tokens = sum(q for q, _ in chunks) + decodes + (pad if i == 0 else 0)
            rank_logits = len(chunks) + decodes if shape.num_logits < 0 else max(1, shape.num_logits // len(ranks))
            per_rank.append(self._rank_ops(chunks, decodes, mean_kv, rank_tokens, rank_logits))
        if len(per_rank) == 1:
            out = per_rank[0]
        else:  # the busiest rank sets the pace (its total, term by term)
            totals = [sum(np.asarray(v, dtype=np.float64) for v in r.values()) if r else 0.0 for r in per_rank]
            out = per_rank[int(np.argmax([np.max(t) if np.ndim(t) else t for t in totals]))]
        all_tokens = tokens + pad
        out.update(self._moe_ops(all_tokens))
        if self._ep_a2a is not None:
            per_gpu = all_tokens / (self.cfg.tp * self.cfg.dp)  # each GPU dispatches its share of the tokens
            out["ep_dispatch_combine"] = m.moe_layers * (
                self._ep_a2a.scalar(per_gpu * self.ep_bytes_per_token("dispatch"))
                + self._ep_a2a.scalar(per_gpu * self.ep_bytes_per_token("combine"))
            )
        return out

    def _pp_send_recv_s(self, tokens: int) -> float:
        if self.cfg.pp <= 1:
            return 0.0
        return float(p2p_s(self._p2p_tier, tokens * self.cfg.model.hidden * ACT_BYTES))

    def breakdown(self, shape: BatchShape, gemm_tokens: int | None = None) -> dict[str, float]:
        mean_kv = np.array([shape.decode_kv_sum / shape.num_decode]) if shape.num_decode else np.zeros(1)
        ops = {k: float(np.asarray(v).ravel()[0]) for k, v in self._model_ops(shape, mean_kv, gemm_tokens).items()}
        if self.cfg.pp > 1 and shape.num_tokens:
            ops["pp_send_recv"] = (self.cfg.pp - 1) * self._pp_send_recv_s(shape.num_tokens)
        if shape.num_tokens and self.cfg.step_overhead_s:
            ops["step_overhead"] = self.cfg.step_overhead_s
        return ops

    def _fixed_total(self, tokens: int, logits: int) -> float:
        """Without attention DP: the step's seconds outside attention (dense terms and experts) at this
        padded token count, the sum of those terms of ``_model_ops``, memoised."""
        key = (tokens, logits)
        cached = self._totals_cache.get(key)
        if cached is not None:
            return cached
        return _remember(
            self._totals_cache, key, sum(self._dense_ops(tokens, logits).values()) + sum(self._moe_ops(tokens).values())
        )

    def _moe_ops(self, all_tokens: int) -> dict[str, float]:
        """The experts' GEMMs over every token of the step (all attention ranks')."""
        return {op.name: op.line.scalar(all_tokens) * op.per_step for op in self._ops if op.scope == "moe"}

    def totals(self, shape: BatchShape, mean_kv: np.ndarray, gemm_tokens: int | None = None):
        """(total, interval) seconds, arrays over ``mean_kv``."""
        compute = np.zeros_like(mean_kv, dtype=np.float64)
        if self.cfg.dp <= 1 and shape.num_tokens:
            # one rank: everything but attention depends on the (padded) token and logit counts only
            chunks = list(shape.prefill_chunks)
            logits = len(chunks) + shape.num_decode if shape.num_logits < 0 else max(1, shape.num_logits)
            compute = compute + self._fixed_total(gemm_tokens or shape.num_tokens, logits)
            compute = compute + sum(self.attention.prefill_s(chunks).values())
            for v in self.attention.decode_s(shape.num_decode, mean_kv).values():
                compute = compute + v
        else:
            for v in self._model_ops(shape, mean_kv, gemm_tokens).values():
                compute = compute + v
        p2p = (self.cfg.pp - 1) * self._pp_send_recv_s(shape.num_tokens)
        total = compute + p2p + self.cfg.step_overhead_s
        interval = compute / self.cfg.pp + self.cfg.step_overhead_s
        return total, interval

    def decode_totals(self, num_decode: int, mean_kv: np.ndarray, gemm_tokens: int | None = None) -> np.ndarray:
        """``totals(...)[0]`` of a decode-only step over an array of mean KV lengths (a simulated
        stretch's steps): the same operations in the same order on the terms that are not zero, without
        the step interval nobody reads (the simulator prices a stretch after nearly every step)."""
        if self.cfg.dp > 1 or num_decode <= 0:
            return self.totals(BatchShape(num_decode=num_decode), mean_kv, gemm_tokens)[0]
        # totals: 0 + the fixed terms + the (no) prefill terms + each decode term, + p2p + overhead
        compute = None
        fixed = self._fixed_total(gemm_tokens or num_decode, num_decode)
        for v in self.attention.decode_s(num_decode, mean_kv).values():
            compute = fixed + v if compute is None else compute + v
        if compute is None:
            compute = np.full(np.shape(mean_kv), fixed)
        p2p = (self.cfg.pp - 1) * self._pp_send_recv_s(num_decode)
        return compute + p2p + self.cfg.step_overhead_s

    def decode_totals_short(
        self, num_decode: int, kv_sum_start: int, steps: int, gemm_tokens: int | None = None
    ) -> list[float] | None:
        """``decode_totals`` of a short stretch (step j's sequences hold kv_sum_start + j x num_decode
        tokens) in plain floats: most simulated stretches are a few steps, for which a dozen numpy
        calls cost more than the arithmetic. The same operations in the same order; None where only
        the array path knows the step (attention DP, DSA, linear attention)."""
        if self.cfg.dp > 1 or num_decode <= 0:
            return None
        fixed = self._fixed_total(gemm_tokens or num_decode, num_decode)
        p2p = (self.cfg.pp - 1) * self._pp_send_recv_s(num_decode)
        overhead = self.cfg.step_overhead_s
        out: list[float] = []
        for j in range(steps):
            terms = self.attention.decode_terms_s(num_decode, (kv_sum_start + j * num_decode) / num_decode)
            if terms is None:
                return None
            compute = fixed
            for v in terms:
                compute = compute + v
            out.append(compute + p2p + overhead)
        return out

    def step_seconds(self, shape: BatchShape, gemm_tokens: int | None = None) -> tuple[float, float] | None:
        """``totals`` for one step in plain floats — every step of the emulation and every step the
        simulator takes one at a time asks this, and a dozen numpy operations on one-element arrays
        cost more than the arithmetic (a worker at 8 streams, profiled, 2026-11-27: pricing a step
        63 -> 37 µs). The same operations in the same order as ``totals``, so the same seconds to the
        last bit (tested);
        None where only the array path knows the step (attention DP, DSA, linear attention)."""
        if self.cfg.dp > 1 or not shape.num_tokens:
            return None
        mean_kv = shape.decode_kv_sum / shape.num_decode if shape.num_decode else 0.0
        decode = self.attention.decode_terms_s(shape.num_decode, mean_kv)
        if decode is None:
            return None
        chunks = list(shape.prefill_chunks)
        logits = len(chunks) + shape.num_decode if shape.num_logits < 0 else max(1, shape.num_logits)
        compute = 0.0 + self._fixed_total(gemm_tokens or shape.num_tokens, logits)
        compute = compute + sum(self.attention.prefill_s(chunks).values())
        for v in decode:
            compute = compute + v
        p2p = (self.cfg.pp - 1) * self._pp_send_recv_s(shape.num_tokens)
        return compute + p2p + self.cfg.step_overhead_s, compute / self.cfg.pp + self.cfg.step_overhead_s

    def step_time(self, shape: BatchShape) -> StepTime:
        if shape.num_tokens == 0:
            return StepTime(0.0, 0.0)
        fast = self.step_seconds(shape)
        if fast is not None:
            return StepTime(*fast)
        mean_kv = np.array([shape.decode_kv_sum / shape.num_decode]) if shape.num_decode else np.zeros(1)
        total, interval = self.totals(shape, mean_kv)
        return StepTime(float(total[0]), float(interval[0]))

    def decode_stretch_s(self, num_decode: int, kv_sum_start: int, steps: int) -> np.ndarray:
        kv_sums = kv_sum_start + np.arange(steps, dtype=np.int64) * num_decode
        shape = BatchShape(num_decode=num_decode, decode_kv_sum=kv_sum_start)
        total, _ = self.totals(shape, kv_sums / num_decode)
        return total

    def ep_bytes_per_token(self, phase: str) -> float:
        """Bytes one token puts on the wire in a wide-EP all-to-all: its hidden state goes to every other
        GPU holding one of its top-k experts (expected distinct GPUs of n when the k experts land
        independently: n (1 - (1 - 1/n)^k), less the sender's own) — in FP8 for the dispatch of a
        quantized (FP8 or 4-bit) checkpoint (DeepEP's low-latency dispatch), BF16 otherwise and for
        the combine."""
        m, n = self.cfg.model, self.cfg.tp * self.cfg.dp
        remote = n * (1 - (1 - 1 / n) ** m.top_k) * (n - 1) / n
        fp8 = phase == "dispatch" and self.quant.moe in ("fp8", "fp8_block", "nvfp4", "mxfp4")
        return remote * m.hidden * (1 if fp8 else ACT_BYTES)

    # ---- helpers for reports and transfers -----------------------------------------------
    def kv_transfer_bytes(self, tokens: int) -> int:
        return self.cfg.model.kv_transfer_bytes(tokens, self.quant.kv_cache)


MEMO_ENTRIES = 8192  # per memo and pool model (a few MB): about every step size a token budget allows


def _remember(memo: dict, key, value):
    """Store a memoised value; a full memo starts over rather than growing without bound."""
    if len(memo) >= MEMO_ENTRIES:
        memo.clear()
    memo[key] = value
    return value


_CACHE: dict[InstanceConfig, InstanceCostModel] = {}


def instance_cost_model(cfg: InstanceConfig) -> InstanceCostModel:
    """Instances of one pool share one precomputed model."""
    model = _CACHE.get(cfg)
    if model is None:
        model = _CACHE[cfg] = InstanceCostModel(cfg)
    return model
