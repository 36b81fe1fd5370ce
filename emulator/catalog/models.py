"""Model architectures read from Hugging Face style ``config.json`` files.

The catalog ships copies of the configs in ``data/models`` (see ``data/NOTICE``);
a spec may also name any path to a ``config.json``. Parameter counts are derived
from the architecture (dense/GQA, MoE with shared experts, DeepSeek MLA), never
typed in, so that a new model needs only its config.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from importlib import resources

DTYPE_BYTES = {"bf16": 2, "fp8": 1}

CATALOG = {
    "llama-3.1-8b": "meta-llama--Meta-Llama-3.1-8B.config.json",
    "llama-3.1-70b": "meta-llama--Meta-Llama-3.1-70B.config.json",
    "llama-3.1-405b": "meta-llama--Meta-Llama-3.1-405B.config.json",
    "qwen3-8b": "Qwen--Qwen3-8B.config.json",
    "qwen3-32b": "Qwen--Qwen3-32B.config.json",
    "qwen3-30b-a3b": "Qwen--Qwen3-30B-A3B.config.json",
    "qwen3-235b-a22b": "Qwen--Qwen3-235B-A22B.config.json",
    "deepseek-v3": "deepseek-ai--DeepSeek-V3.config.json",
    "deepseek-v3.2": "deepseek-ai--DeepSeek-V3.2.config.json",
    "mixtral-8x22b": "mistralai--Mixtral-8x22B-v0.1.config.json",
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

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    # ---- parameter counts -------------------------------------------------
    def attention_params(self) -> int:
        h = self.hidden
        if self.is_mla:
            qk = self.qk_nope_dim + self.qk_rope_dim
            q = h * self.q_lora_rank + self.q_lora_rank * self.heads * qk if self.q_lora_rank else h * self.heads * qk
            kv_a = h * (self.kv_lora_rank + self.qk_rope_dim)
            kv_b = self.kv_lora_rank * self.heads * (self.qk_nope_dim + self.v_head_dim)
            o = self.heads * self.v_head_dim * h
            return q + kv_a + kv_b + o
        return h * self.heads * self.head_dim * 2 + 2 * h * self.kv_heads * self.head_dim

    def dense_mlp_params(self) -> int:
        return 3 * self.hidden * self.intermediate

    def moe_mlp_params(self) -> int:
        experts = self.num_experts * 3 * self.hidden * self.moe_intermediate
        shared = 3 * self.hidden * self.shared_intermediate * self.shared_experts
        router = self.hidden * self.num_experts
        return experts + shared + router

    def total_params(self) -> int:
        embed = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        dense_layers = self.layers - self.moe_layers
        per_layer_norms = 2 * self.hidden
        return (
            embed
            + self.layers * (self.attention_params() + per_layer_norms)
            + dense_layers * self.dense_mlp_params()
            + self.moe_layers * self.moe_mlp_params()
        )

    def active_params(self) -> int:
        """Parameters touched per token (MoE: top-k routed plus shared experts)."""
        if not self.is_moe:
            return self.total_params()
        routed_active = self.top_k * 3 * self.hidden * self.moe_intermediate
        all_routed = self.num_experts * 3 * self.hidden * self.moe_intermediate
        return self.total_params() - self.moe_layers * (all_routed - routed_active)

    def weight_bytes(self, dtype: str) -> float:
        return float(self.total_params() * DTYPE_BYTES[dtype])

    def kv_bytes_per_token(self, kv_dtype: str) -> int:
        """Logical KV-cache bytes per token for the whole model (all layers, all heads).

        GQA: 2 * layers * kv_heads * head_dim * bytes. MLA caches one latent vector
        plus the rope key per layer: layers * (kv_lora_rank + rope_dim) * bytes.
        """
        b = DTYPE_BYTES[kv_dtype]
        if self.is_mla:
            return self.layers * (self.kv_lora_rank + self.qk_rope_dim) * b
        return 2 * self.layers * self.kv_heads * self.head_dim * b


def arch_from_config(name: str, cfg: dict) -> ModelArch:
    """Map a Hugging Face config to an architecture; raises ValueError naming missing keys."""
    required = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in required if k not in cfg]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(missing)}")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    layers = int(cfg["num_hidden_layers"])
    inter = int(cfg.get("intermediate_size") or 4 * hidden)
    experts = int(cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
    moe_kwargs: dict = {}
    if experts:
        moe_inter = int(cfg.get("moe_intermediate_size") or inter)
        shared = int(cfg.get("n_shared_experts") or 0)
        shared_inter = int(cfg.get("shared_expert_intermediate_size") or (moe_inter if shared else 0))
        if cfg.get("shared_expert_intermediate_size") and not shared:
            shared = 1
        moe_kwargs = dict(
            num_experts=experts,
            top_k=int(cfg.get("num_experts_per_tok") or 2),
            moe_intermediate=moe_inter,
            shared_experts=shared,
            shared_intermediate=shared_inter,
            dense_layers=int(cfg.get("first_k_dense_replace") or 0),
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
        **moe_kwargs,
        **mla_kwargs,
    )


def _normalise(name: str) -> str:
    key = name.lower().split("/")[-1]
    key = key.replace("meta-llama-", "llama-").replace("-v0.1", "").replace("-instruct", "")
    return key


@cache
def get_model(name: str) -> ModelArch:
    """A catalog name (``llama-3.1-8b``), a Hugging Face id, or a path to a config.json."""
    if name.endswith(".json") or (os.path.sep in name and os.path.exists(name)):
        with open(name, encoding="utf-8") as fh:
            return arch_from_config(os.path.basename(name).removesuffix(".json"), json.load(fh))
    key = _normalise(name)
    if key not in CATALOG:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(CATALOG)} (or a path to a config.json)")
    text = resources.files("emulator.catalog").joinpath("data/models", CATALOG[key]).read_text("utf-8")
    return arch_from_config(key, json.loads(text))
