"""``infemu fault inject|clear|list``: faults on a running local cluster, by hand or from a script.

An injected fault is validated as a ``spec.faults`` entry would be (same fields, same errors),
resolved against the cluster's topology, carried out by the same injector a run's schedule
uses, and recorded in the run directory's ``faults.json`` (``emulator/faults/record.py``) until it is
cleared.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pydantic import ValidationError

from emulator.cluster.admin import AdminError, get_admin
from emulator.cluster.links import newest_run
from emulator.cluster.local import RunState
from emulator.errors import InputError, SpecError
from emulator.faults import record
from emulator.faults.local import LocalInjector
from emulator.faults.schedule import Fault, resolve_one
from emulator.spec import FaultSpec, InferenceCluster, format_validation_error, load_clusters

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent  # where ``python -m emulator...`` resolves


def _state(run_dir: str | None) -> RunState:
    try:
        return RunState.load(run_dir or newest_run())
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"--run-dir: no running cluster there ({exc})") from None


def _cluster(state: RunState) -> InferenceCluster:
    """The running cluster's spec, read once per command (every fault it handles resolves against it)."""
    return next(c for c in load_clusters(state.spec) if c.name == state.cluster)


def _resolve(cluster: InferenceCluster, declared: dict) -> Fault:
    try:
        spec = FaultSpec.model_validate({"atSeconds": 0, **declared})
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, declared, "fault ")) from None
    return resolve_one(cluster.spec, spec)


def _dilation(state: RunState, cluster: InferenceCluster) -> float:
    """The cluster's time dilation: a run's override where it had one, else the spec's."""
    return state.time_dilation if state.time_dilation is not None else cluster.spec.emulation.time_dilation


def inject(run_dir: str | None, declared: dict) -> list[str]:
    """Start one fault now; it stays until `infemu fault clear`, or until its durationSeconds (emulated,
    so times the cluster's time dilation on the wall) pass: a detached process clears it then. A fault
    that reached none of its targets is not recorded as active (its lines say why)."""
    state = _state(run_dir)
    data = record.read(state.run_dir)
    name = declared.get("name") or f"{declared.get('kind')}-{len(data['timeline'])}"
    if name in data["active"]:
        raise InputError(f"fault {name!r} is active; clear it first or choose another --name")
    cluster = _cluster(state)
    fault = _resolve(cluster, {**declared, "name": name})
    lines = LocalInjector(state).apply(fault, True)
    if lines and all(": failed: " in line for line in lines):
        return [*lines, f"{name}: reached none of its targets; not recorded as active"]
    since = time.time()
    entry = {**declared, "name": name, "since": since}
    if fault.kind != "kill" and fault.duration_s is not None:
        wall = fault.duration_s * _dilation(state, cluster)
        entry["until"] = since + wall
        _expire_later(state, name, since, wall)
        lines.append(f"{name}: ends in {wall:.1f} s (durationSeconds {fault.duration_s:g})")
    with record.updating(state.run_dir) as data:
        if fault.kind != "kill":  # a kill is over once sent; its supervisor restarts the process
            data["active"][name] = entry
        data["timeline"].append(
            {"name": name, "kind": fault.kind, "started": since, "ended": None if fault.kind != "kill" else since}
        )
    return lines


def _expire_later(state: RunState, name: str, since: float, wall_s: float) -> None:
    """A detached process that clears the fault when its time is up, whether or not anyone runs
    ``infemu`` again (logs/faults.log says what it did)."""
    log = open(os.path.join(state.run_dir, "logs", "faults.log"), "a", encoding="utf-8")  # noqa: SIM115
    with log:
        subprocess.Popen(
            [sys.executable, "-m", "emulator.faults.expire", state.run_dir, name, repr(since), repr(wall_s)],
            stdout=log,
            stderr=log,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=_PACKAGE_ROOT,
        )


def expire(run_dir: str, name: str, since: float) -> list[str]:
    """Clear ``name`` if it is still the fault injected at ``since`` (not cleared by hand meanwhile,
    nor cleared and injected again under the same name)."""
    return clear(run_dir, name, since=since)


def clear(run_dir: str | None, name: str | None, since: float | None = None) -> list[str]:
    """Clear one active fault, or all of them (``name`` None): taken off the record first, under its
    lock, so a concurrent clear (the fault's own expiry) does not clear it twice, then taken off the
    instances. ``since``: only the fault injected then (an expiry), else nothing."""
    state = _state(run_dir)
    cluster = _cluster(state)
    with record.updating(state.run_dir) as data:
        if since is not None and data["active"].get(name, {}).get("since") != since:
            return [f"{name}: already cleared"]
        names = list(data["active"]) if name is None else [name]
        if name is not None and name not in data["active"]:
            raise InputError(f"no active fault {name!r}; active: {', '.join(data['active']) or 'none'}")
        cleared = [data["active"].pop(n) for n in names]
        for entry in data["timeline"]:
            if entry["name"] in names and entry.get("ended") is None:
                entry["ended"] = time.time()
    lines = []
    for declared in cleared:
        declared = {k: v for k, v in declared.items() if k not in ("since", "until")}
        lines += LocalInjector(state).apply(_resolve(cluster, declared), False)
    return lines


def reapply(run_dir: str, restarted: set[str]) -> list[str]:
    """Put the active live faults back on instances that were restarted: a slow GPU, a degraded link or
    a partition belongs to the hardware and the network, not to the process, so a restart does not
    heal it (the supervisor calls this once a restarted instance is ready)."""
    state = _state(run_dir)
    lines: list[str] = []
    active = list(record.read(state.run_dir)["active"].values())
    if not active:
        return lines
    cluster = _cluster(state)
    for declared in active:
        declared = {k: v for k, v in declared.items() if k not in ("since", "until")}
        fault = _resolve(cluster, declared)
        if fault.members & restarted:
            lines += [
                f"{fault.name}: re-applied after a restart: {line}" for line in LocalInjector(state).apply(fault, True)
            ]
    return lines


def listing(run_dir: str | None) -> dict:
    """Active faults as recorded (by hand, and those of a run's schedule), and each worker's and the
    router's own view of its state."""
    state = _state(run_dir)
    data = record.read(state.run_dir)
    live: dict = {}
    engines = state.engines()  # (AFD's FFN instances have no fault admin)
    for p in (q for q in state.processes if q.role == "router" or q in engines):
        try:
            live[p.name] = get_admin(p.url, "/admin/fault", state.token)
        except AdminError as exc:
            live[p.name] = {"error": str(exc)}
    return {"active": data["active"], "timeline": data["timeline"], "schedule": data["schedule"], "live": live}
