"""The model a spec serves: the catalog architecture with the spec's precisions resolved.

``spec.model.dtype`` / ``moeDtype`` / ``kvCacheDtype`` are ``auto`` by default, which keeps
the checkpoint's own quantization (``emulator.catalog.quant``); explicit values override it.
Validation, the memory plan, the cost model and the workers all read the model from here,
so a precision is resolved in one place.
"""

from __future__ import annotations

from functools import cache

from emulator.catalog.models import ModelArch, get_model, with_quantization
from emulator.catalog.quant import override
from emulator.spec import ModelSpec


def _explicit(value: str) -> str | None:
    return None if value == "auto" else value


@cache
def _served(name: str, dtype: str, moe_dtype: str, kv: str) -> ModelArch:
    base = get_model(name)
    quant = override(base.quant, gemm=_explicit(dtype), moe=_explicit(moe_dtype), kv_cache=_explicit(kv))
    return with_quantization(base, quant)


def served_model(spec: ModelSpec) -> ModelArch:
    """Raises KeyError / ValueError / OSError for an unknown or unreadable model (validation reports them)."""
    return _served(spec.name, spec.dtype, spec.moe_dtype, spec.kv_cache_dtype)
