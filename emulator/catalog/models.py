"""Model architectures read from Hugging Face style ``config.json`` files.

The catalog ships copies of the configs in ``data/models`` (see ``data/NOTICE``),
named ``Org--Name.config.json`` with ModelOpt's ``Org--Name.hf_quant_config.json``
beside them where the checkpoint has one. A spec names a model by its Hugging Face
id (``Qwen/Qwen3-235B-A22B-FP8``), by the id's last part (``qwen3-235b-a22b-fp8``),
by a short alias (``llama-3.1-8b``), or by a path to a ``config.json``.

Parameter counts are derived from the architecture, never typed in: dense/GQA,
MoE with shared experts, DeepSeek MLA with its sparse-attention indexer (DSA),
sliding-window layers (gpt-oss), linear-attention layers (Qwen3.5's Gated
DeltaNet), multimodal wrappers whose language model sits under ``text_config``.
Precisions come from the checkpoint (``emulator.catalog.quant``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from functools import cache
from importlib import resources

from emulator.catalog.quant import KV_BYTES, Quantization, read_quantization, weight_bytes

DTYPE_BYTES = {"bf16": 2, "fp8": 1}  # activation / KV element sizes

# Short names kept from the first catalog (README and examples use them).
ALIASES = {
    "llama-3.1-8b": "meta-llama--Meta-Llama-3.1-8B",
    "llama-3.1-70b": "meta-llama--Meta-Llama-3.1-70B",
    "llama-3.1-405b": "meta-llama--Meta-Llama-3.1-405B",
    "qwen3-8b": "Qwen--Qwen3-8B",
    "qwen3-32b": "Qwen--Qwen3-32B",
    "qwen3-30b-a3b": "Qwen--Qwen3-30B-A3B",
    "qwen3-235b-a22b": "Qwen--Qwen3-235B-A22B",
    "deepseek-v3": "deepseek-ai--DeepSeek-V3",
    "deepseek-v3.2": "deepseek-ai--DeepSeek-V3.2",
    "mixtral-8x22b": "mistralai--Mixtral-8x22B-v0.1",
    # The calibration set names GLM-5 under its old organisation (../shared/data/README.md).
    "zhipuai/glm-5": "zai-org--GLM-5",
    "meta-llama/llama-3.1-8b-instruct": "meta-llama--Meta-Llama-3.1-8B",
    "meta-llama/llama-3.1-70b": "meta-llama--Meta-Llama-3.1-70B",
    "meta-llama/llama-3.1-70b-instruct": "meta-llama--Meta-Llama-3.1-70B",
}


@dataclass(frozen=True)
class ModelArch:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width
    vocab: int
    tie_embeddings: bool
    max_model_len: int
    # MoE (0 experts = dense)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate: int = 0
    shared_experts: int = 0
    shared_intermediate: int = 0
    dense_layers: int = 0  # leading dense layers before the MoE layers (DeepSeek first_k_dense_replace)
    # MLA (kv_lora_rank 0 = standard attention)
    kv_lora_rank: int = 0
    q_lora_rank: int = 0
    qk_rope_dim: int = 0
    qk_nope_dim: int = 0
    v_head_dim: int = 0
    # DeepSeek sparse attention (DSA): a lightweight indexer picks index_topk tokens per query
    index_topk: int = 0
    index_heads: int = 0
    index_dim: int = 0
    # Layer kinds besides full attention: sliding-window layers (KV capped at the window) and
    # linear-attention layers (Gated DeltaNet: a fixed-size recurrent state per sequence).
    sliding_layers: int = 0
    sliding_window: int = 0
    linear_layers: int = 0
    linear_k_heads: int = 0
    linear_v_heads: int = 0
    linear_k_dim: int = 0
    linear_v_dim: int = 0
    linear_conv: int = 0
    attn_output_gate: bool = False  # q_proj also produces a sigmoid gate (Qwen3.5)
    quant: Quantization = field(default_factory=Quantization)
    hf_id: str = ""

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def is_dsa(self) -> bool:
        return self.index_topk > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    @property
    def full_layers(self) -> int:
        """Layers with full (global) softmax attention over the whole context."""
        return self.layers - self.sliding_layers - self.linear_layers

    @property
    def softmax_layers(self) -> int:
        return self.layers - self.linear_layers

    # ---- parameter counts -------------------------------------------------
    def attention_params(self) -> int:
        """Parameters of one softmax-attention layer's projections."""
        h = self.hidden
        if self.is_mla:
            qk = self.qk_nope_dim + self.qk_rope_dim
            q = h * self.q_lora_rank + self.q_lora_rank * self.heads * qk if self.q_lora_rank else h * self.heads * qk
            kv_a = h * (self.kv_lora_rank + self.qk_rope_dim)
            kv_b = self.kv_lora_rank * self.heads * (self.qk_nope_dim + self.v_head_dim)
            o = self.heads * self.v_head_dim * h
            indexer = 0
            if self.is_dsa:  # q_b for the indexer heads, one key projection, per-head weights
                q_src = self.q_lora_rank or h
                indexer = q_src * self.index_heads * self.index_dim + h * self.index_dim + h * self.index_heads
            return q + kv_a + kv_b + o + indexer
        q_out = self.heads * self.head_dim * (2 if self.attn_output_gate else 1)
        return h * q_out + 2 * h * self.kv_heads * self.head_dim + self.heads * self.head_dim * h

    def linear_attention_params(self) -> int:
        """One Gated DeltaNet layer: in_proj_qkvz, in_proj_ba, depthwise conv, out_proj."""
        if not self.linear_layers:
            return 0
        h = self.hidden
        k = self.linear_k_heads * self.linear_k_dim
        v = self.linear_v_heads * self.linear_v_dim
        return h * (2 * k + 2 * v) + h * 2 * self.linear_v_heads + (2 * k + v) * self.linear_conv + v * h

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def routed_expert_params(self) -> int:
        """All routed experts of one MoE layer."""
        return self.num_experts * 3 * self.hidden * self.moe_intermediate

    def shared_expert_params(self) -> int:
        return 3 * self.hidden * self.shared_intermediate * self.shared_experts

    def moe_mlp_params(self) -> int:
        return self.routed_expert_params() + self.shared_expert_params() + self.hidden * self.num_experts

    def total_params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        dense_layers = self.layers - self.moe_layers
        per_layer_norms = 2 * self.hidden
        return (
            embed
            + self.softmax_layers * self.attention_params()
            + self.linear_layers * self.linear_attention_params()
            + self.layers * per_layer_norms
            + dense_layers * self.dense_mlp_params()
            + self.moe_layers * self.moe_mlp_params()
        )

    def active_params(self) -> int:
        """Parameters touched per token (MoE: top-k routed plus shared experts)."""
        if not self.is_moe:
            return self.total_params()
        routed_active = self.top_k * 3 * self.hidden * self.moe_intermediate
        return self.total_params() - self.moe_layers * (self.routed_expert_params() - routed_active)

    def weight_bytes(self, quant: Quantization | str | None = None) -> float:
        """Bytes of all weights at the checkpoint's precisions (or the given ones).

        A plain precision name applies to every linear layer; the embedding and the LM head stay
        BF16 in every serving framework here.
        """
        if quant is None:
            quant = self.quant
        elif isinstance(quant, str):
            quant = Quantization(gemm=quant, attention=quant, moe=quant)
        bf16 = weight_bytes("bf16")
        embed = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        dense_layers = self.layers - self.moe_layers
        attention = self.softmax_layers * self.attention_params() + self.linear_layers * self.linear_attention_params()
        dense = dense_layers * self.dense_mlp_params() + self.moe_layers * self.shared_expert_params()
        experts = self.moe_layers * self.routed_expert_params()
        small = self.layers * 2 * self.hidden + self.moe_layers * self.hidden * self.num_experts
        return (
            (embed + small) * bf16
            + attention * weight_bytes(quant.attention)
            + dense * weight_bytes(quant.gemm)
            + experts * weight_bytes(quant.moe)
        )

    # ---- KV cache --------------------------------------------------------------
    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """KV-cache bytes that every retained token adds (all full-attention layers, all heads).

        GQA: 2 * layers * kv_heads * head_dim * bytes. MLA caches one latent vector plus the
        rope key per layer: layers * (kv_lora_rank + rope_dim) * bytes; DSA adds the indexer's
        FP8 key and its fp32 scale per layer. Sliding-window and linear-attention layers hold a
        bounded amount per sequence instead (``kv_bytes_per_seq``).
        """
        b = KV_BYTES[kv_dtype]
        if self.is_mla:
            indexer = self.index_dim + 4 if self.is_dsa else 0
            return self.full_layers * ((self.kv_lora_rank + self.qk_rope_dim) * b + indexer)
        return 2 * self.full_layers * self.kv_heads * self.head_dim * b

    def _sliding_bytes(self, tokens: int, kv_dtype: str) -> int:
        return (
            self.sliding_layers
            * min(tokens, self.sliding_window)
            * 2
            * self.kv_heads
            * self.head_dim
            * (KV_BYTES[kv_dtype])
        )

    def _linear_state_bytes(self) -> int:
        """Gated DeltaNet state per sequence: fp32 recurrent state (vLLM's ``mamba_ssm_dtype``)
        plus the bf16 convolution window."""
        if not self.linear_layers:
            return 0
        k = self.linear_k_heads * self.linear_k_dim
        v = self.linear_v_heads * self.linear_v_dim
        state = self.linear_v_heads * self.linear_k_dim * self.linear_v_dim * 4
        conv = (2 * k + v) * max(self.linear_conv - 1, 0) * 2
        return self.linear_layers * (state + conv)

    def kv_bytes_per_seq(self, kv_dtype: str) -> int:
        """Bounded per-sequence state: sliding-window KV (at most the window) and the
        linear-attention state."""
        return self._sliding_bytes(self.sliding_window, kv_dtype) + self._linear_state_bytes()

    def kv_transfer_bytes(self, tokens: int, kv_dtype: str) -> int:
        """What a prefill instance hands to a decode instance for a prompt of ``tokens``."""
        return (
            tokens * self.kv_bytes_per_token(kv_dtype)
            + self._sliding_bytes(tokens, kv_dtype)
            + self._linear_state_bytes()
        )


# ---- reading configs --------------------------------------------------------------------


def _layer_kinds(cfg: dict, layers: int) -> dict:
    """Counts of sliding-window and linear-attention layers, from ``layer_types`` or intervals."""
    types = cfg.get("layer_types")
    if not types and cfg.get("full_attention_interval"):
        every = int(cfg["full_attention_interval"])
        types = ["full_attention" if (i + 1) % every == 0 else "linear_attention" for i in range(layers)]
    out: dict = {}
    if types:
        sliding = sum(1 for t in types if t == "sliding_attention")
        linear = sum(1 for t in types if t == "linear_attention")
        unknown = sorted({t for t in types if t not in ("full_attention", "sliding_attention", "linear_attention")})
        if unknown:
            raise ValueError(f"layer_types {', '.join(unknown)} are not supported")
        if sliding:
            if not cfg.get("sliding_window"):
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")
            out.update(sliding_layers=sliding, sliding_window=int(cfg["sliding_window"]))
        if linear:
            out.update(
                linear_layers=linear,
                linear_k_heads=int(cfg.get("linear_num_key_heads") or 0),
                linear_v_heads=int(cfg.get("linear_num_value_heads") or 0),
                linear_k_dim=int(cfg.get("linear_key_head_dim") or 0),
                linear_v_dim=int(cfg.get("linear_value_head_dim") or 0),
                linear_conv=int(cfg.get("linear_conv_kernel_dim") or 4),
            )
            if not all(out[k] for k in ("linear_k_heads", "linear_v_heads", "linear_k_dim", "linear_v_dim")):
                raise ValueError("linear_attention layers need linear_num_key_heads/value_heads and head dims")
    elif cfg.get("use_sliding_window") and cfg.get("sliding_window"):
        window_layers = int(cfg.get("max_window_layers") or layers)
        out.update(sliding_layers=min(window_layers, layers), sliding_window=int(cfg["sliding_window"]))
    return out


def arch_from_config(name: str, cfg: dict, hf_quant: dict | None = None, hf_id: str = "") -> ModelArch:
    """Map a Hugging Face config to an architecture; raises ValueError naming what is missing.

    A multimodal wrapper's language model is read from ``text_config`` (its quantization config
    may sit on either level).
    """
    qcfg = cfg.get("quantization_config")
    if isinstance(cfg.get("text_config"), dict):
        text = cfg["text_config"]
        qcfg = qcfg or text.get("quantization_config")
        cfg = {**{k: v for k, v in cfg.items() if k != "text_config"}, **text}
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    for key in required:
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 10_000_000:
            raise ValueError(f"config.json: {key} is {value!r}; it must be a positive integer")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(cfg["num_hidden_layers"])
    experts = int(cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    inter = int(cfg.get("intermediate_size") or (0 if experts else 4 * hidden))
    moe_kwargs: dict = {}
    if experts:
        moe_inter = int(cfg.get("moe_intermediate_size") or inter)
        shared = int(cfg.get("n_shared_experts") or 0)
        shared_inter = int(
            cfg.get("shared_expert_intermediate_size")
            or cfg.get("shared_intermediate_size")
            or (moe_inter if shared else 0)
        )
        if shared_inter and not shared:
            shared = 1
        dense = int(cfg.get("first_k_dense_replace") or 0) or len(cfg.get("mlp_only_layers") or [])
        moe_kwargs = dict(
            num_experts=experts,
            top_k=int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 2),
            moe_intermediate=moe_inter,
            shared_experts=shared if shared_inter else 0,
            shared_intermediate=shared_inter,
            dense_layers=dense,
        )
    mla_kwargs: dict = {}
    if cfg.get("kv_lora_rank"):
        mla_kwargs = dict(
            kv_lora_rank=int(cfg["kv_lora_rank"]),
            q_lora_rank=int(cfg.get("q_lora_rank") or 0),
            qk_rope_dim=int(cfg.get("qk_rope_head_dim") or 64),
            qk_nope_dim=int(cfg.get("qk_nope_head_dim") or 128),
            v_head_dim=int(cfg.get("v_head_dim") or 128),
        )
        head_dim = mla_kwargs["qk_nope_dim"] + mla_kwargs["qk_rope_dim"]
        if cfg.get("index_topk"):
            mla_kwargs.update(
                index_topk=int(cfg["index_topk"]),
                index_heads=int(cfg.get("index_n_heads") or 64),
                index_dim=int(cfg.get("index_head_dim") or 128),
            )
    kinds = _layer_kinds(cfg, layers)
    quant = read_quantization(qcfg, hf_quant, layers)
    return ModelArch(
        name=name,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=inter,
        vocab=int(cfg["vocab_size"]),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_model_len=int(cfg.get("max_position_embeddings") or 4096),
        attn_output_gate=bool(cfg.get("attn_output_gate", False)),
        quant=quant,
        hf_id=hf_id,
        **moe_kwargs,
        **mla_kwargs,
        **kinds,
    )


# ---- the shipped catalog -----------------------------------------------------------------

_DATA = "data/models"


@cache
def _shipped() -> dict[str, str]:
    """Lookup key -> file stem (``Org--Name``) for every shipped config."""
    folder = resources.files("emulator.catalog").joinpath(_DATA)
    index: dict[str, str] = {}
    for entry in folder.iterdir():
        if not entry.name.endswith(".config.json"):
            continue
        stem = entry.name.removesuffix(".config.json")
        org, _, model = stem.partition("--")
        index[f"{org}/{model}".lower()] = stem
        index.setdefault(model.lower(), stem)
        index.setdefault(_normalise(model), stem)
    for alias, stem in ALIASES.items():
        index[alias] = stem
    return index


def catalog_names() -> list[str]:
    """Hugging Face ids of the shipped configs, sorted."""
    return sorted(stem.replace("--", "/", 1) for stem in set(_shipped().values()))


def _normalise(name: str) -> str:
    key = name.lower().split("/")[-1]
    return key.replace("meta-llama-", "llama-").replace("-v0.1", "").replace("-instruct", "")


def resolve(name: str) -> str | None:
    """The shipped file stem for a model name, or None."""
    index = _shipped()
    low = name.lower()
    for key in (low, _normalise(low), low.split("/")[-1]):
        if key in index:
            return index[key]
    return None


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _load_path(name: str) -> ModelArch:
    path = os.path.join(name, "config.json") if os.path.isdir(name) else name
    cfg = _read_json(path)
    folder, base = os.path.split(path)
    stem = base.removesuffix(".json").removesuffix(".config")
    hf_quant = None
    for candidate in (
        os.path.join(folder, f"{stem}.hf_quant_config.json"),
        os.path.join(folder, "hf_quant_config.json"),
    ):
        if candidate != path and os.path.exists(candidate):
            hf_quant = _read_json(candidate)
            break
    return arch_from_config(stem if stem != "config" else os.path.basename(folder) or stem, cfg, hf_quant)


@cache
def get_model(name: str) -> ModelArch:
    """A Hugging Face id, its last part, a short alias, or a path to a config.json (or its folder)."""
    if name.endswith(".json") or (os.path.sep in name and os.path.exists(name)):
        return _load_path(name)
    stem = resolve(name)
    if stem is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(catalog_names())} (or a path to a config.json)")
    folder = resources.files("emulator.catalog").joinpath(_DATA)
    cfg = json.loads(folder.joinpath(f"{stem}.config.json").read_text("utf-8"))
    quant_file = folder.joinpath(f"{stem}.hf_quant_config.json")
    hf_quant = json.loads(quant_file.read_text("utf-8")) if quant_file.is_file() else None
    short = next((a for a, s in ALIASES.items() if s == stem and "/" not in a), stem.split("--")[-1].lower())
    return arch_from_config(short, cfg, hf_quant, hf_id=stem.replace("--", "/", 1))


def with_quantization(model: ModelArch, quant: Quantization) -> ModelArch:
    return replace(model, quant=quant)
