"""``decode``: the second leg of prefill/decode disaggregation; pulls a prompt's KV from the
prefill instance that computed it, then generates."""

from __future__ import annotations

from emulator.roles import RoleInfo


def _problems(spec) -> list[str]:
    if not any(p.role == "prefill" and p.replicas > 0 for p in spec.pools):
        return ["spec.pools: a decode pool needs a prefill pool; add role: prefill or use role: aggregated"]
    return []


ROLE = RoleInfo(
    name="decode",
    summary="generation after pulling the prompt's KV from a prefill instance",
    engine=True,
    front=False,
    kv_consumer=True,
    gateway_label="decode",
    problems=_problems,
)
