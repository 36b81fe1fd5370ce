"""``kvstore``: a remote KV-cache tier shared by engines (not available yet)."""

from emulator.roles import RoleInfo

ROLE = RoleInfo(
    name="kvstore",
    summary="a remote KV-cache tier",
    engine=False,
    front=False,
    unavailable="is not available in this version; remove the pool (prefix caching stays local to each engine)",
)
