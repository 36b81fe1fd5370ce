"""``aggregated``: one engine runs prefill and decode of its own requests (vLLM's default)."""

from emulator.roles import RoleInfo

ROLE = RoleInfo(
    name="aggregated",
    summary="prefill and decode in one engine",
    engine=True,
    front=True,
    gateway_label="both",
)
