"""``decode``: the second leg of prefill/decode disaggregation; pulls a prompt's KV from the
prefill instance that computed it, then generates."""

from emulator.roles import RoleInfo, needs_pool

ROLE = RoleInfo(
    name="decode",
    summary="generation after pulling the prompt's KV from a prefill instance",
    engine=True,
    front=False,
    kv_consumer=True,
    gateway_label="decode",
    problems=needs_pool(
        "prefill", "spec.pools: a decode pool needs a prefill pool; add role: prefill or use role: aggregated"
    ),
)
