"""``ffn``: the expert side of attention-FFN disaggregation. Its instances hold the routed (and
shared) experts of an MoE model and compute each micro-batch an ``attention`` pool sends them;
they have no scheduler and no API of their own: the attention pool that names them in
``afd.ffnPool`` is the engine."""

from __future__ import annotations

from emulator.roles import RoleInfo
from emulator.roles.attention import AFD_ROLES, afd_owners


def _problems(spec) -> list[str]:
    from emulator.capacity import ffn_memory_problems
    from emulator.catalog.gpus import get_gpu
    from emulator.checkpoint import served_model

    problems = []
    for i, pool in enumerate(spec.pools):
        at = f"spec.pools[{i}]"
        if pool.afd is not None and pool.role not in AFD_ROLES:
            problems.append(
                f"{at}.afd: only attention and decode pools take afd (this pool's role is {pool.role});"
                " use role attention for an aggregated AFD engine"
            )
        if pool.role != "ffn":
            continue
        owners = [p.name for p in afd_owners(spec, pool.name)]
        if not owners:
            problems.append(
                f"{at}: ffn pool {pool.name!r} serves no attention pool; name it in an attention pool's afd.ffnPool"
            )
        elif len(owners) > 1:
            problems.append(f"{at}: ffn pool {pool.name!r} is named by several attention pools ({', '.join(owners)})")
        problems.extend(ffn_memory_problems(spec, pool, at, served_model(spec.model), get_gpu(spec.gpu)))
    return problems


ROLE = RoleInfo(
    name="ffn",
    summary="the routed and shared experts of an AFD group (no API of its own)",
    engine=False,
    front=False,
    member=True,
    problems=_problems,
    service="emulator.serve.afd_exchange:create_ffn_app",
)
