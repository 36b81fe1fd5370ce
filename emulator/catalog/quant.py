"""Weight and KV-cache precisions, read from a checkpoint's quantization config.

Quantization is a property of the checkpoint, not of the model family: which
layers are quantized, to what, and whether the KV cache is FP8 come from the
checkpoint's ``quantization_config`` (Hugging Face) or ModelOpt's
``hf_quant_config.json``. NVIDIA's NVFP4 releases keep attention in BF16 and
declare an FP8 KV cache; native FP8 releases (DeepSeek, MiniMax, Qwen, GLM)
block-quantize every linear layer and say nothing about the KV cache
(``../shared/data/README.md``, "Quantization facts are per checkpoint").

Precision names follow aiconfigurator's kernel tables (``gemm_quant_mode`` /
``moe_quant_mode``): ``bf16``, ``fp8`` (per-tensor scales), ``fp8_block``
(128x128 block scales), ``nvfp4`` (FP4 E2M1 with an FP8 scale per 16 values),
``mxfp4`` (FP4 with an E8M0 scale per 32 values, OCP MX), ``int4_wo``
(weight-only INT4 with a BF16 scale per group of 32).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PRECISIONS = ("bf16", "fp8", "fp8_block", "nvfp4", "mxfp4", "int4_wo")
KV_PRECISIONS = ("bf16", "fp8")

# Bytes per weight, scales included: fp8_block one fp32 scale per 128x128 block; nvfp4 one fp8 scale
# per 16 values (NVIDIA, "Introducing NVFP4", 2025); mxfp4 one 8-bit scale per 32 values (OCP
# Microscaling Formats spec v1.0); int4_wo one bf16 scale per group of 32 (Kimi-K2.5's
# compressed-tensors config: group_size 32).
WEIGHT_BYTES = {
    "bf16": 2.0,
    "fp8": 1.0,
    "fp8_block": 1.0 + 4.0 / (128 * 128),
    "nvfp4": 0.5 + 1.0 / 16,
    "mxfp4": 0.5 + 1.0 / 32,
    "int4_wo": 0.5 + 2.0 / 32,
}
KV_BYTES = {"bf16": 2, "fp8": 1}


def weight_bytes(precision: str) -> float:
    if precision not in WEIGHT_BYTES:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    return WEIGHT_BYTES[precision]


@dataclass(frozen=True)
class Quantization:
    """Precision of each family of weights and of the KV cache.

    ``gemm``: dense linear layers (dense MLPs, shared experts); ``attention``: the attention
    projections (QKV/O, MLA, linear-attention projections); ``moe``: routed experts. The
    embedding and the LM head stay in BF16 in every checkpoint here.
    """

    gemm: str = "bf16"
    attention: str = "bf16"
    moe: str = "bf16"
    kv_cache: str = "bf16"
    source: str = "unquantized"

    def describe(self) -> str:
        return (
            f"dense {self.gemm}, attention {self.attention}, experts {self.moe}, KV cache {self.kv_cache}"
            f" ({self.source})"
        )


# ---- reading a checkpoint ----------------------------------------------------------------

# An attention exclusion counts when it names the whole module (``self_attn``, ``self_attn*``,
# ``re:.*self_attn.*``) or one of its main projections, not a norm or the DSA indexer inside it.
_ATTENTION = re.compile(
    r"(self_attn|linear_attn)(\*|\.\*|$|\.(q|k|v|o|qkv|q_a|q_b|kv_a|kv_b|in|out)_proj|\.kv_a_proj_with_mqa|\.in_proj)"
)
_SHARED = re.compile(r"shared_expert")
_DENSE_MLP = re.compile(r"mlp\\?\.\(?(gate_up|gate|up|down)[|a-z_)]*_proj")
_LAYER_INDEX = re.compile(r"layers\.(\d+)\.")


def _excluded(patterns: list[str], family: re.Pattern, layers: int) -> bool:
    """True when the exclusion list keeps this family unquantized in most layers.

    Patterns are either wildcards over every layer (``model.layers.*.self_attn``,
    ``re:.*self_attn.*``, ``*.mlp.shared_expert.*``) or one entry per layer; a family counts as
    excluded when a wildcard names it or when at least half of the layers are listed.
    """
    indices: set[int] = set()
    for p in patterns:
        if not family.search(p):
            continue
        m = _LAYER_INDEX.search(p)
        if m is None or "*" in p.split("layers.")[-1].split(".")[0]:
            return True
        indices.add(int(m.group(1)))
    return layers > 0 and len(indices) * 2 >= layers


def _int4_group(cfg: dict) -> bool:
    for group in (cfg.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w.get("num_bits") == 4 and w.get("type") == "int" and not group.get("input_activations"):
            return True
    return False


def _fp4_group(cfg: dict) -> bool:
    for group in (cfg.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        if w.get("num_bits") == 4 and w.get("type") == "float":
            return True
    return False


def _fp8_kv(scheme: object) -> bool:
    return isinstance(scheme, dict) and scheme.get("num_bits") == 8 and scheme.get("type") == "float"


def read_quantization(qcfg: dict | None, hf_quant: dict | None, layers: int) -> Quantization:
    """The checkpoint's precisions from ``quantization_config`` and/or ``hf_quant_config.json``.

    Raises ValueError for a quantization method this catalog cannot price, naming it.
    """
    if hf_quant:  # ModelOpt's own file is the authority where it exists
        q = hf_quant.get("quantization", hf_quant)
        algo = str(q.get("quant_algo") or "").upper()
        excl = list(q.get("exclude_modules") or [])
        kv = "fp8" if str(q.get("kv_cache_quant_algo") or "").upper() == "FP8" else "bf16"
        base = {"NVFP4": "nvfp4", "FP8": "fp8", "FP8_BLOCK": "fp8_block"}.get(algo)
        if base is None:
            raise ValueError(f"hf_quant_config quant_algo {algo!r} is not supported (NVFP4, FP8, FP8_BLOCK)")
        return _with_exclusions(base, excl, kv, layers, f"hf_quant_config {algo}, KV {kv}")
    if not qcfg:
        return Quantization()
    method = str(qcfg.get("quant_method") or "").lower()
    if method == "fp8":
        base = "fp8_block" if qcfg.get("weight_block_size") else "fp8"
        excl = list(qcfg.get("modules_to_not_convert") or qcfg.get("ignored_layers") or [])
        return _with_exclusions(base, excl, "bf16", layers, f"quantization_config fp8 ({base})")
    if method == "mxfp4":  # gpt-oss: MXFP4 experts, everything else BF16
        excl = list(qcfg.get("modules_to_not_convert") or [])
        q = _with_exclusions("mxfp4", excl, "bf16", layers, "quantization_config mxfp4")
        return Quantization(gemm="bf16", attention=q.attention, moe="mxfp4", kv_cache="bf16", source=q.source)
    if method == "modelopt":
        algo = str(qcfg.get("quant_algo") or "").upper()
        base = {"NVFP4": "nvfp4", "FP8": "fp8"}.get(algo) or ("nvfp4" if _fp4_group(qcfg) else None)
        if base is None:
            raise ValueError(f"modelopt quant_algo {algo!r} is not supported (NVFP4, FP8)")
        kv = "fp8" if _fp8_kv(qcfg.get("kv_cache_scheme")) else "bf16"
        return _with_exclusions(base, list(qcfg.get("ignore") or []), kv, layers, f"modelopt {algo}, KV {kv}")
    if method == "compressed-tensors":
        kv = "fp8" if _fp8_kv(qcfg.get("kv_cache_scheme")) else "bf16"
        if _int4_group(qcfg):
            return _with_exclusions(
                "int4_wo", list(qcfg.get("ignore") or []), kv, layers, "compressed-tensors int4 weight-only"
            )
        if _fp4_group(qcfg):
            return _with_exclusions("nvfp4", list(qcfg.get("ignore") or []), kv, layers, "compressed-tensors nvfp4")
        raise ValueError("compressed-tensors config groups other than int4 weight-only and fp4 are not supported")
    raise ValueError(f"quant_method {method!r} is not supported (fp8, mxfp4, modelopt, compressed-tensors)")


def _with_exclusions(base: str, excl: list[str], kv: str, layers: int, source: str) -> Quantization:
    attention = "bf16" if _excluded(excl, _ATTENTION, layers) else base
    shared = _excluded(excl, _SHARED, layers)
    dense = _excluded(excl, _DENSE_MLP, layers)
    gemm = "bf16" if (shared or dense) else base
    return Quantization(gemm=gemm, attention=attention, moe=base, kv_cache=kv, source=source)


def override(q: Quantization, *, gemm: str | None, moe: str | None, kv_cache: str | None) -> Quantization:
    """Apply a spec's explicit precisions on top of the checkpoint's.

    An explicit dense precision also applies to the attention projections unless the checkpoint
    keeps attention unquantized (NVFP4 releases) — serving frameworks quantize what the
    checkpoint quantizes.
    """
    attention = q.attention
    if gemm is not None:
        attention = gemm if (q.attention != "bf16" or q.gemm == "bf16") else "bf16"
    out = Quantization(
        gemm=gemm or q.gemm,
        attention=attention,
        moe=moe or (gemm if (gemm and q.moe == "bf16") else q.moe),
        kv_cache=kv_cache or q.kv_cache,
        source=q.source,
    )
    if out != q:
        out = Quantization(out.gemm, out.attention, out.moe, out.kv_cache, f"{q.source}; spec overrides")
    return out
