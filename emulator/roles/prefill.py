"""``prefill``: the first leg of prefill/decode disaggregation; holds each finished prompt's KV
until a ``decode`` instance pulls it (vLLM's NixlConnector producer)."""

from emulator.roles import RoleInfo, needs_pool

ROLE = RoleInfo(
    name="prefill",
    summary="prompt only; its KV goes to a decode instance",
    engine=True,
    front=True,
    kv_producer=True,
    gateway_label="prefill",
    problems=needs_pool(
        "decode", "spec.pools: a prefill pool needs a decode pool to hand its KV cache to; add role: decode"
    ),
)
