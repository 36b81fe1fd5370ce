"""The roles a pool can take, in one place: what each role's instances do and what it needs.

Every driver asks this registry instead of branching on role names: the validator (which roles
run and which peers they need), the simulator and the worker processes (who runs an engine, who
takes new requests, who holds or pulls KV), the router (which backends are a request's first leg)
and the operator (which pods carry a gateway's role label). A new role is one module here plus
its own behaviour, not another branch in each of those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the spec imports nothing from here; only the checks read it
    from emulator.spec import ClusterSpec


@dataclass(frozen=True)
class RoleInfo:
    name: str
    summary: str
    engine: bool  # runs a Scheduler + cost model (a worker with the OpenAI API)
    front: bool  # the router sends a request's first leg here
    kv_producer: bool = False  # holds a finished prefill's KV for a decode peer (P/D)
    kv_consumer: bool = False  # pulls KV from a producer before decoding (P/D)
    member: bool = False  # a passive member of another pool's engine (AFD's FFN side)
    gateway_label: str | None = None  # llm-d's role label on its pods (llm-d.ai/role)
    unavailable: str | None = None  # why a spec cannot use it yet (None: available)
    problems: Callable[[ClusterSpec], list[str]] | None = None  # cross-pool requirements
    # a role without an engine runs its own service: "module:function" building its aiohttp app from
    # (cluster, instance, topology, shaping); imported only by the process that serves it
    service: str | None = None


def needs_pool(role: str, problem: str) -> Callable[[ClusterSpec], list[str]]:
    """A role's requirement that the spec has a pool of ``role`` with replicas (P/D's two halves)."""

    def check(spec: ClusterSpec) -> list[str]:
        return [] if any(p.role == role and p.replicas > 0 for p in spec.pools) else [problem]

    return check


def _registry() -> dict[str, RoleInfo]:
    from emulator.roles import aggregated, attention, decode, ffn, kvstore, prefill, rag

    return {m.ROLE.name: m.ROLE for m in (aggregated, prefill, decode, attention, ffn, rag, kvstore)}


_ROLES: dict[str, RoleInfo] | None = None


def roles() -> dict[str, RoleInfo]:
    global _ROLES
    if _ROLES is None:
        _ROLES = _registry()
    return _ROLES


def get_role(name: str) -> RoleInfo:
    try:
        return roles()[name]
    except KeyError:
        raise KeyError(f"unknown role {name!r}; known: {', '.join(roles())}") from None


def names(predicate: Callable[[RoleInfo], bool]) -> tuple[str, ...]:
    return tuple(r.name for r in roles().values() if predicate(r))


def front_roles() -> tuple[str, ...]:
    """Roles a new request is sent to first."""
    return names(lambda r: r.front)


def is_front(role: str) -> bool:
    return get_role(role).front


def holds_kv_for_peer(role: str) -> bool:
    return get_role(role).kv_producer


def pulls_kv(role: str) -> bool:
    return get_role(role).kv_consumer


def service_factory(role: str) -> Callable:
    """The app factory of a role that runs a service of its own instead of an engine."""
    import importlib

    target = get_role(role).service
    if target is None:
        raise ValueError(f"role {role!r} runs an engine, not a service of its own")
    module, _, func = target.partition(":")
    return getattr(importlib.import_module(module), func)


def role_problems(spec: ClusterSpec) -> list[str]:
    """Each role's own cross-pool requirements, and roles that cannot be used yet."""
    problems: list[str] = []
    live = [p for p in spec.pools if p.replicas > 0]
    for i, pool in enumerate(spec.pools):
        info = get_role(pool.role)
        if info.unavailable and pool.replicas > 0:
            problems.append(f"spec.pools[{i}].role: {pool.role!r} {info.unavailable}")
    for info in _present(live):
        if info.problems is not None:
            problems.extend(info.problems(spec))
    if not any(get_role(p.role).front for p in live):
        problems.append(
            "spec.pools: no pool serves requests; add a pool with role aggregated (or prefill + decode, "
            "or attention + ffn)"
        )
    return problems


def _present(pools: Iterable) -> list[RoleInfo]:
    seen: dict[str, RoleInfo] = {}
    for p in pools:
        seen.setdefault(p.role, get_role(p.role))
    return list(seen.values())
