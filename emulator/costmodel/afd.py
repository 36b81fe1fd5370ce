"""One step of an attention-FFN disaggregated (AFD) group: micro-batches ping-pong between sides.

An AFD group (MegaScale-Infer, arXiv:2504.02263 §3-4; Step-3, arXiv:2507.19427) is one logical
engine: ``x`` attention ranks hold the KV cache and run attention with the dense layers, ``y`` FFN
instances hold the experts. For every MoE layer each micro-batch goes

    attention (its ranks) -> activations to the FFN side -> experts -> results back -> next layer

and four resources work on it in turn: the attention ranks, the attention->FFN direction of the
link, the FFN GPUs and the FFN->attention direction. Each resource takes micro-batches in order,
layer by layer, so while one micro-batch is in the experts (or on the wire) the attention side
computes the next: with ``m`` micro-batches the step approaches ``layers x m x`` the busiest
resource's share, with one micro-batch it is the plain sum. ``pingpong_s`` is that list schedule,
exact for any per-micro-batch times; it stops iterating once the schedule repeats (a max-plus
recurrence becomes periodic) and extrapolates the remaining layers.

The attention side is an ``InstanceCostModel`` with ``part="attention"`` (no expert kernels, one
TP all-reduce per MoE layer: the experts' combine comes back over the link); the FFN side is the
fused-MoE kernel over every FFN GPU of the group (experts split ``y x ep`` ways) plus the shared
experts. Each token's hidden state goes to the FFN instances holding its top-k experts, at most
``min(top_k, y)`` of them, in BF16 both ways; an attention rank sends over its tp GPUs' ports and
an FFN instance receives over its own (``emulator.catalog.links``: bandwidth per GPU endpoint).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from emulator.catalog.links import LinkTier
from emulator.costmodel.instance import ACT_BYTES, InstanceConfig, InstanceCostModel
from emulator.costmodel.interface import BatchShape

TAIL_OPS = ("lm_head",)  # once per step, after the last layer, on the attention side
DENSE_MLP_OPS = ("mlp_gate_up", "mlp_down")  # the dense (non-MoE) layers' MLPs stay with attention


def pingpong_s(attn, send, ffn, back, moe_layers: int, dense=None, tail=None):
    """Time from the first micro-batch's start to the last one's finish (seconds; arrays over steps
    allowed). ``attn``/``send``/``ffn``/``back``: per micro-batch, one MoE layer's time on each
    resource; ``dense``: per micro-batch, all dense layers (attention side, before the MoE layers);
    ``tail``: per micro-batch, the work after the last layer (attention side)."""
    m = len(attn)
    dense = dense if dense is not None else [0.0] * m
    tail = tail if tail is not None else [0.0] * m
    mx = np.maximum
    a = u = f = d = 0.0
    ready = []
    for i in range(m):
        a = a + dense[i]
        ready.append(a)
    previous = None
    layer = 0
    while layer < moe_layers:
        for i in range(m):
            a = mx(a, ready[i]) + attn[i]
            u = mx(u, a) + send[i]
            f = mx(f, u) + ffn[i]
            d = mx(d, f) + back[i]
            ready[i] = d
        layer += 1
        state = [u - a, f - a, d - a, *(r - a for r in ready)]
        if previous is not None and all(
            np.allclose(s, p, rtol=0, atol=1e-12) for s, p in zip(state, previous[1], strict=True)
        ):
            step = a - previous[0]  # periodic from here on: every further layer adds the same period
            left = moe_layers - layer
            a, ready = a + step * left, [r + step * left for r in ready]
            break
        previous = (a, state)
    for i in range(m):
        a = mx(a, ready[i]) + tail[i]
    return a


def split_micro_batches(shape: BatchShape, m: int) -> list[BatchShape]:
    """The step's sequences in ``m`` micro-batches of nearly equal tokens (decodes spread evenly,
    prefill chunks to the lightest micro-batch, largest first); empty ones are dropped."""
    base, extra = divmod(shape.num_decode, m)
    decodes = [base + (1 if i < extra else 0) for i in range(m)]
    chunks: list[list[tuple[int, int]]] = [[] for _ in range(m)]
    load = [float(d) for d in decodes]
    for chunk in sorted(shape.prefill_chunks, key=lambda c: -c[0]):
        i = int(np.argmin(load))
        chunks[i].append(chunk)
        load[i] += chunk[0]
    kv_per = shape.decode_kv_sum / shape.num_decode if shape.num_decode else 0.0
    out = []
    for i in range(m):
        if decodes[i] or chunks[i]:
            out.append(BatchShape(tuple(chunks[i]), decodes[i], round(kv_per * decodes[i])))
    return out


class MicroBatch(NamedTuple):
    """One micro-batch's work: the attention side's operators (whole model), its dense layers, one
    MoE layer's attention, the tail, and one MoE layer's exchange (each way) and experts."""

    tokens: int
    ops: dict
    dense: object
    attn: object
    tail: object
    link: float
    ffn: float


@dataclass(frozen=True)
class AfdConfig:
    attention: InstanceConfig  # part="attention"; dp = attention ranks of the group (x)
    ffn_instances: int  # y
    ffn_gpus_per_instance: int  # tp x dp of one FFN instance
    ffn_ep: int  # expert parallelism inside one FFN instance
    tier: LinkTier  # between the attention ranks and the FFN instances
    micro_batches: int


class AfdKernels:
    """The kernel side of an AFD group's ``CostModel`` (what ``EngineStepModel`` wraps with the
    engine's host-side work, which runs with the attention side's scheduler)."""

    def __init__(self, cfg: AfdConfig, attention: InstanceCostModel) -> None:
        self.afd = cfg
        self.att = attention
        self.cfg = attention.cfg
        self.quant = attention.quant
        m = self.cfg.model
        self.sources = dict(attention.sources)
        ffn_tp = cfg.ffn_gpus_per_instance // cfg.ffn_ep
        self._moe, src = attention.linear.moe(
            self.quant.moe,
            m.hidden,
            m.moe_intermediate,
            m.top_k,
            m.num_experts,
            ffn_tp,
            cfg.ffn_ep * cfg.ffn_instances,
            self.cfg.moe_distribution,
        )
        self.sources["ffn_experts"] = (
            f"{src} over {cfg.ffn_instances} FFN instance(s) x {cfg.ffn_gpus_per_instance} GPUs"
        )
        self._shared = None
        if m.shared_experts:
            inter = m.shared_intermediate * m.shared_experts // cfg.ffn_gpus_per_instance
            up, _ = attention.linear.gemm(self.quant.gemm, 2 * inter, m.hidden)
            down, _ = attention.linear.gemm(self.quant.gemm, m.hidden, inter)
            self._shared = (up, down)
        self.fanout = min(m.top_k, cfg.ffn_instances)
        self.sources["afd_wait_ffn_and_exchange"] = (
            f"ping-pong of {cfg.micro_batches} micro-batch(es) (emulator/costmodel/afd.py): experts {src},"
            f" exchange over {cfg.tier.name}"
        )
        self.sources["afd_exchange"] = (
            f"{cfg.tier.name}: {self.fanout} copies of each token's hidden state each way (BF16), "
            f"{cfg.micro_batches} micro-batch(es)"
        )

    def eager_kernels(self) -> float:
        """An eager step's launches: the attention side's (its scheduler's host drives the step), once
        per micro-batch; the FFN instances launch theirs on their own hosts meanwhile."""
        return self.att.eager_kernels() * self.afd.micro_batches

    # ---- per micro-batch ---------------------------------------------------------------
    def _ffn_s(self, tokens: int) -> float:
        """One MoE layer on the FFN side for a micro-batch of ``tokens`` (all attention ranks')."""
        t = self._moe.scalar(tokens)
        if self._shared is not None:
            per_instance = max(1, -(-tokens // self.afd.ffn_instances))
            t += self._shared[0].scalar(per_instance) + self._shared[1].scalar(per_instance)
        return t

    def exchange_bytes(self, tokens: int) -> float:
        """Activation bytes of one micro-batch of ``tokens`` in one direction of one MoE layer."""
        return float(tokens) * self.cfg.model.hidden * ACT_BYTES * self.fanout

    def _link_s(self, tokens: int, rank_tokens: int) -> float:
        """One direction of one MoE layer: the busiest attention rank's ports or one FFN instance's."""
        c, tier = self.afd, self.afd.tier
        rank_side = self.exchange_bytes(rank_tokens) / (self.cfg.tp * tier.bandwidth)
        ffn_side = self.exchange_bytes(tokens) / c.ffn_instances / (c.ffn_gpus_per_instance * tier.bandwidth)
        return tier.latency_s + max(rank_side, ffn_side)

    def _sides(self, shape: BatchShape, mean_kv: np.ndarray, gemm_tokens: int | None) -> list[MicroBatch]:
        m = self.cfg.model
        parts = split_micro_batches(shape, self.afd.micro_batches)
        scale = (gemm_tokens or shape.num_tokens) / max(shape.num_tokens, 1)
        rows = []
        for part in parts:
            tokens = part.num_tokens
            padded = int(np.ceil(tokens * scale))
            ops = self.att._model_ops(part, mean_kv, padded)
            total = sum(np.asarray(v, dtype=np.float64) for v in ops.values())
            tail = sum((ops.get(k, 0.0) for k in TAIL_OPS), 0.0)
            dense_mlp = sum((ops.get(k, 0.0) for k in DENSE_MLP_OPS), 0.0)
            per_layer = (total - tail - dense_mlp) / m.layers
            dense = per_layer * (m.layers - m.moe_layers) + dense_mlp
            busiest = max(sum(q for q, _ in chunks) + d for chunks, d in self.att._ranks(part))
            link = self._link_s(padded, int(np.ceil(busiest * scale)))
            rows.append(MicroBatch(padded, ops, dense, per_layer, tail, link, self._ffn_s(padded)))
        return rows

    # ---- what EngineStepModel asks -------------------------------------------------------------
    def _pingpong(self, rows: list[MicroBatch]):
        """The kernels' time of the step these micro-batches make up (arrays over steps allowed)."""
        links = [r.link for r in rows]
        return pingpong_s(
            [r.attn for r in rows],
            links,
            [r.ffn for r in rows],
            links,
            self.cfg.model.moe_layers,
            dense=[r.dense for r in rows],
            tail=[r.tail for r in rows],
        )

    def step_seconds(self, shape: BatchShape, gemm_tokens: int | None = None) -> None:
        """An AFD step has no plain-float path (``InstanceCostModel.step_seconds``): ``totals`` prices it."""
        return None

    def decode_totals_short(
        self, num_decode: int, kv_sum_start: int, steps: int, gemm_tokens: int | None = None
    ) -> None:
        """Nor for a short decode stretch (``InstanceCostModel.decode_totals_short``): ``decode_totals``."""
        return None

    def decode_totals(self, num_decode: int, mean_kv: np.ndarray, gemm_tokens: int | None = None) -> np.ndarray:
        """``InstanceCostModel.decode_totals``: a decode-only step's totals over mean KV lengths."""
        return self.totals(BatchShape(num_decode=num_decode), mean_kv, gemm_tokens)[0]

    def totals(self, shape: BatchShape, mean_kv: np.ndarray, gemm_tokens: int | None = None):
        if shape.num_tokens == 0:
            return np.zeros_like(mean_kv, dtype=np.float64), np.zeros_like(mean_kv, dtype=np.float64)
        total = self._pingpong(self._sides(shape, mean_kv, gemm_tokens))
        total = np.broadcast_to(np.asarray(total, dtype=np.float64), np.shape(mean_kv)).copy()
        total = total + self.cfg.step_overhead_s
        return total, total

    def terms(self, shape: BatchShape, gemm_tokens: int | None = None) -> dict[str, float]:
        """Where an AFD step goes: each side's busy time, the exchange, the step, and each side's idle
        fraction (the micro-batch bubbles)."""
        mean_kv = np.array([shape.decode_kv_sum / shape.num_decode]) if shape.num_decode else np.zeros(1)
        rows = self._sides(shape, mean_kv, gemm_tokens)
        layers = self.cfg.model.moe_layers

        def scalar(v) -> float:
            return float(np.asarray(v).ravel()[0])

        step = scalar(self._pingpong(rows)) if rows else 0.0

        attention = sum(scalar(r.dense) + layers * scalar(r.attn) + scalar(r.tail) for r in rows)
        ffn = sum(layers * r.ffn for r in rows)
        wire = sum(layers * r.link for r in rows)
        return {
            "micro_batches": float(len(rows)),
            "attention_busy_s": attention,
            "ffn_busy_s": ffn,
            "exchange_each_way_s": wire,
            "exchange_bytes_each_way": sum(layers * self.exchange_bytes(r.tokens) for r in rows),
            "step_s": step,
            "attention_idle": max(0.0, 1 - attention / step) if step > 0 else 0.0,
            "ffn_idle": max(0.0, 1 - ffn / step) if step > 0 else 0.0,
        }

    def breakdown(self, shape: BatchShape, gemm_tokens: int | None = None) -> dict[str, float]:
        """The attention side's kernels (all micro-batches) and the time it waits for the FFN side and
        the exchange: the two add up to the step."""
        if shape.num_tokens == 0:
            return {}
        mean_kv = np.array([shape.decode_kv_sum / shape.num_decode]) if shape.num_decode else np.zeros(1)
        out: dict[str, float] = {}
        rows = self._sides(shape, mean_kv, gemm_tokens)
        for row in rows:
            for k, v in row.ops.items():
                out[k] = out.get(k, 0.0) + float(np.asarray(v).ravel()[0])
        step = float(np.asarray(self._pingpong(rows)).ravel()[0])
        out["afd_wait_ffn_and_exchange"] = max(0.0, step - sum(out.values()))
        if self.cfg.step_overhead_s:
            out["step_overhead"] = self.cfg.step_overhead_s
        return out

    def kv_transfer_bytes(self, tokens: int) -> int:
        return self.att.kv_transfer_bytes(tokens)
