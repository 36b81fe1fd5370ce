"""``spec.faults`` resolved against the topology: which instances each fault hits, and when.

Pure functions of the spec: the simulator, the local injector and the operator read the same
``Fault`` list, so a chaos study swept in the simulator is the one the cluster then runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from emulator.errors import SpecError
from emulator.roles import get_role
from emulator.spec import ClusterSpec, ConstantArrival, FaultSpec, GammaArrival, PoissonArrival
from emulator.topology import Topology, place

ROUTER = "router"  # a partition group may name the router: it then cannot reach the other group


@dataclass(frozen=True)
class Fault:
    """One declared fault with its targets resolved to instance names."""

    index: int
    name: str
    kind: str
    at_s: float | None  # seconds after the run's first request, or
    after_requests: int | None  # once this many requests were sent
    duration_s: float | None  # None: a kill (instantaneous), or until the run ends
    instances: tuple[str, ...] = ()  # kill/hang/slow: the instances; link: the senders
    peers: tuple[str, ...] = ()  # link: the receivers
    groups: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())  # partition
    factor: float = 1.0  # slow
    bandwidth_factor: float = 1.0
    added_latency_s: float = 0.0  # link latency + loss as retransmit delay
    cut: bool = False
    flap_period_s: float | None = None
    spec: dict = field(default_factory=dict, compare=False)  # as declared (for reports and status)

    @property
    def label(self) -> str:
        return self.name

    @property
    def members(self) -> set[str]:
        """The instances whose own state carries the fault (a restarted one loses it): the targets, and
        a partition's groups (the router aside)."""
        return {*self.instances, *self.groups[0], *self.groups[1]} - {ROUTER}

    def pairs(self) -> list[tuple[str, str]]:
        """(sender, receiver) pairs a link or partition fault cuts or degrades."""
        if self.kind == "partition":
            a, b = self.groups
            return [(x, y) for x in a for y in b] + [(y, x) for x in a for y in b]
        return [(s, p) for s in self.instances for p in self.peers if s != p]


def _members(topo: Topology, name: str) -> list[str]:
    """A pool name (every replica) or one instance name; [] when it names neither."""
    pool = [i.name for i in topo.instances if i.pool == name]
    if pool:
        return pool
    return [i.name for i in topo.instances if i.name == name]


def _targets(topo: Topology, f: FaultSpec) -> list[str]:
    assert f.target is not None
    t = f.target
    if t.instance is not None:
        return _members(topo, t.instance) if any(i.name == t.instance for i in topo.instances) else []
    pool = [i.name for i in topo.instances if i.pool == t.pool]
    return pool[: max(1, math.ceil(t.fraction * len(pool)))] if pool else []


def fault_problems(spec: ClusterSpec, topo: Topology) -> list[str]:
    """Names in ``spec.faults`` that match nothing, each as one line naming the field."""
    problems: list[str] = []
    tiers = {topo.scale_up.name, topo.scale_out.name}
    members = {i.name for i in topo.instances if not get_role(i.role).engine}  # ffn, rag, kvstore
    for k, f in enumerate(spec.faults):
        at = f"spec.faults[{k}]"
        if f.target is not None:
            t = f.target
            if t.instance is not None and not any(i.name == t.instance for i in topo.instances):
                names = ", ".join(i.name for i in topo.instances)
                problems.append(f"{at}.target.instance: {t.instance!r} is not an instance; known: {names}")
            if t.pool is not None and not any(i.pool == t.pool for i in topo.instances):
                pools = ", ".join(sorted({i.pool for i in topo.instances}))
                problems.append(f"{at}.target.pool: {t.pool!r} has no replicas; pools: {pools}")
            if t.peer is not None and not _members(topo, t.peer):
                problems.append(f"{at}.target.peer: {t.peer!r} names no pool or instance")
            if t.tier is not None and t.tier not in tiers:
                problems.append(f"{at}.target.tier: {t.tier!r} is not a tier of this cluster; tiers: {sorted(tiers)}")
        for g, group in enumerate(f.between or []):
            for j, name in enumerate(group):
                if name != ROUTER and not _members(topo, name):
                    problems.append(f"{at}.between[{g}][{j}]: {name!r} names no pool or instance (or 'router')")
        open_loop = isinstance(spec.workload.arrival, PoissonArrival | GammaArrival | ConstantArrival)
        if f.kind == "burst" and not open_loop:
            problems.append(
                f"{at}.kind: a burst multiplies an open-loop rate; use a poisson, gamma or constant arrival (an mmpp "
                "arrival has bursts of its own)"
            )
        named = [n for n in (f.target.instance, f.target.pool, f.target.peer) if n] if f.target is not None else []
        named += [n for group in (f.between or []) for n in group if n != ROUTER]
        touched = sorted({m for n in named for m in _members(topo, n)} & members)
        if touched:
            kinds = ", ".join(sorted({topo.by_name(m).role for m in touched}))
            problems.append(
                f"{at}: {', '.join(touched)} run no engine (role {kinds}); faults on them and their links are not"
                " modelled yet: target the engines (for ffn: the attention engine that uses them) instead"
            )
        if f.kind == "kill" and spec.emulation.instances_per_process > 1:
            problems.append(
                f"{at}.kind: a kill is a SIGKILL of the instance's process, which hosts "
                f"{spec.emulation.instances_per_process} instances (spec.emulation.instancesPerProcess): it would take "
                "the others down too; set instancesPerProcess to 1 for kill faults, or use hang"
            )
        names = [x.name for x in spec.faults[:k] if x.name]
        if f.name and f.name in names:
            problems.append(f"{at}.name: {f.name!r} is used twice; fault names must be unique")
    return problems


def resolve_faults(spec: ClusterSpec, topo: Topology) -> list[Fault]:
    """Every declared fault with its instances; call after ``fault_problems`` found none."""
    out = []
    for k, f in enumerate(spec.faults):
        common = dict(
            index=k,
            name=f.name or f"{f.kind}-{k}",
            kind=f.kind,
            at_s=f.at_seconds,
            after_requests=f.after_requests,
            duration_s=f.duration_seconds,
            spec=f.model_dump(by_alias=True, exclude_none=True),
        )
        if f.kind == "partition":
            a, b = (
                tuple(n for name in g for n in ([ROUTER] if name == ROUTER else _members(topo, name)))
                for g in f.between or []
            )
            out.append(Fault(**common, groups=(a, b)))
            continue
        if f.kind == "burst":
            out.append(Fault(**common, factor=f.factor or 1.0))
            continue
        instances = tuple(_targets(topo, f))
        if f.kind != "link":
            out.append(Fault(**common, instances=instances, factor=f.factor or 1.0))
            continue
        t, link = f.target, f.link
        assert t is not None and link is not None
        peers = [i for i in topo.instances if t.peer is None or i.name in _members(topo, t.peer)]
        if t.tier is not None:
            peers = [p for p in peers if any(topo.tier_between(topo.by_name(s), p).name == t.tier for s in instances)]
        latency = ((link.latency_us or 0.0) * 1e-6) + link.loss_retransmit_ms * 1e-3
        out.append(
            Fault(
                **common,
                instances=instances,
                peers=tuple(p.name for p in peers),
                bandwidth_factor=link.bandwidth_factor,
                added_latency_s=latency,
                cut=link.cut,
                flap_period_s=link.flap_period_seconds,
            )
        )
    return out


def cut_at(fault: Fault, since_start_s: float) -> bool:
    """Whether a link fault cuts the link ``since_start_s`` after it began: its ``cut``, or for a
    flapping link the phase (cut first, then restored, every half period)."""
    if fault.flap_period_s is None:
        return fault.cut
    return int(since_start_s / (fault.flap_period_s / 2)) % 2 == 0


def phases(fault: Fault, start_s: float, end_s: float) -> list[tuple[float, bool]]:
    """A flapping link's (time, cut) switches over [start, end); other faults: on at start."""
    if fault.flap_period_s is None:
        return [(start_s, fault.cut)]
    half = fault.flap_period_s / 2
    n = min(int((end_s - start_s) / half) + 1, 10_000)
    return [(start_s + i * half, i % 2 == 0) for i in range(n) if start_s + i * half < end_s]


def resolve_one(spec: ClusterSpec, fault: FaultSpec, where: str = "fault") -> Fault:
    """One fault given now (``infemu fault inject``, a Fault resource) against a cluster's topology;
    SpecError with ``where`` in place of ``spec.faults[0]`` when it names what the cluster lacks."""
    with_fault = spec.model_copy(update={"faults": [fault]})
    topo = place(with_fault)
    problems = fault_problems(with_fault, topo)
    if problems:
        raise SpecError([p.replace("spec.faults[0]", where) for p in problems])
    return resolve_faults(with_fault, topo)[0]


@dataclass(frozen=True)
class AdminCall:
    """One change a fault makes through an admin endpoint: on an instance, or on the router(s)."""

    target: str  # an instance name, or ROUTER
    path: str  # /admin/fault or /admin/link
    body: dict
    label: str  # for the report line; "annotation" calls are not reported
    reported: bool = True


def admin_calls(fault: Fault, on: bool, cut: bool | None = None) -> list[AdminCall]:
    """What starting (``on``) or clearing a fault sends, wherever it runs (the local injector and the
    operator map targets to URLs); a kill's process or pod death is the driver's own. ``cut`` overrides
    a link fault's cut (a flapping link's phase). Last, the ``infemu_fault_active`` annotation."""
    calls: list[AdminCall] = []
    if fault.kind in ("hang", "slow"):
        body = {"hang": on} if fault.kind == "hang" else {"slow": fault.factor if on else 1.0}
        calls += [AdminCall(n, "/admin/fault", body, f"{n}: {fault.kind} {on}") for n in fault.instances]
    elif fault.kind in ("link", "partition"):
        cut_now = fault.cut if cut is None else cut
        for sender, peer in fault.pairs():
            if ROUTER in (sender, peer):
                continue
            if not on:
                link: dict = {"to": peer, "reset": True}
            elif fault.kind == "partition" or cut_now:
                link = {"to": peer, "cut": True}
            else:
                link = {
                    "to": peer,
                    "cut": False,
                    "bandwidth_factor": fault.bandwidth_factor,
                    "extra_latency_us": fault.added_latency_s * 1e6,
                }
            calls.append(AdminCall(sender, "/admin/link", link, f"{sender} -> {peer}"))
        a, b = fault.groups
        cut_off = [n for n in (b if ROUTER in a else a if ROUTER in b else ()) if n != ROUTER]
        if cut_off:
            body = {"unreachable": cut_off if on else []}
            calls.append(AdminCall(ROUTER, "/admin/fault", body, f"router -x- {', '.join(cut_off)}"))
    annotation = {"annotate": fault.name, "kind": fault.kind, "active": on and fault.kind != "kill"}
    calls.append(AdminCall(ROUTER, "/admin/fault", annotation, "annotation", reported=False))
    return calls
