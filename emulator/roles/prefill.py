"""``prefill``: the first leg of prefill/decode disaggregation; holds each finished prompt's KV
until a ``decode`` instance pulls it (vLLM's NixlConnector producer)."""

from __future__ import annotations

from emulator.roles import RoleInfo


def _problems(spec) -> list[str]:
    if not any(p.role == "decode" and p.replicas > 0 for p in spec.pools):
        return ["spec.pools: a prefill pool needs a decode pool to hand its KV cache to; add role: decode"]
    return []


ROLE = RoleInfo(
    name="prefill",
    summary="prompt only; its KV goes to a decode instance",
    engine=True,
    front=True,
    kv_producer=True,
    gateway_label="prefill",
    problems=_problems,
)
