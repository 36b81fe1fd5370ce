"""``infemu fault inject|clear|list``: faults on a running local cluster, by hand or from a script.

An injected fault is validated as a ``spec.faults`` entry would be (same fields, same errors),
resolved against the cluster's topology, carried out by the same injector a run's schedule
uses, and recorded in the run directory's ``faults.json`` until it is cleared.
"""

from __future__ import annotations

import json
import os
import time

from pydantic import ValidationError

from emulator.cluster.admin import AdminError, get_admin
from emulator.cluster.links import newest_run
from emulator.cluster.local import RunState
from emulator.errors import InputError, SpecError
from emulator.faults.local import FAULTS_FILE, LocalInjector
from emulator.faults.schedule import Fault, resolve_one
from emulator.spec import FaultSpec, format_validation_error, load_clusters


def _state(run_dir: str | None) -> RunState:
    try:
        return RunState.load(run_dir or newest_run())
    except (OSError, ValueError, TypeError) as exc:
        raise InputError(f"--run-dir: no running cluster there ({exc})") from None


def _record(state: RunState) -> dict:
    path = os.path.join(state.run_dir, FAULTS_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        data = {}
    data.setdefault("timeline", [])
    data.setdefault("active", {})
    return data


def _save(state: RunState, data: dict) -> None:
    path = os.path.join(state.run_dir, FAULTS_FILE)
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1)
    os.replace(path + ".tmp", path)


def _resolve(state: RunState, declared: dict) -> Fault:
    cluster = next(c for c in load_clusters(state.spec) if c.name == state.cluster)
    try:
        spec = FaultSpec.model_validate({"atSeconds": 0, **declared})
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, declared, "fault ")) from None
    return resolve_one(cluster.spec, spec)


def inject(run_dir: str | None, declared: dict) -> list[str]:
    """Start one fault now; it stays until `infemu fault clear` (or its durationSeconds passes)."""
    state = _state(run_dir)
    data = _record(state)
    name = declared.get("name") or f"{declared.get('kind')}-{len(data['timeline'])}"
    if name in data["active"]:
        raise InputError(f"fault {name!r} is active; clear it first or choose another --name")
    fault = _resolve(state, {**declared, "name": name})
    lines = LocalInjector(state).apply(fault, True)
    data["active"][name] = {**declared, "name": name, "since": time.time()}
    data["timeline"].append({"name": name, "kind": fault.kind, "started": time.time(), "ended": None})
    _save(state, data)
    return lines


def clear(run_dir: str | None, name: str | None) -> list[str]:
    """Clear one active fault, or all of them (``name`` None)."""
    state = _state(run_dir)
    data = _record(state)
    names = list(data["active"]) if name is None else [name]
    if name is not None and name not in data["active"]:
        raise InputError(f"no active fault {name!r}; active: {', '.join(data['active']) or 'none'}")
    lines = []
    for n in names:
        declared = data["active"].pop(n)
        declared.pop("since", None)
        lines += LocalInjector(state).apply(_resolve(state, declared), False)
        for entry in data["timeline"]:
            if entry["name"] == n and entry.get("ended") is None:
                entry["ended"] = time.time()
    _save(state, data)
    return lines


def listing(run_dir: str | None) -> dict:
    """Active faults as recorded, and each worker's and the router's own view of its state."""
    state = _state(run_dir)
    data = _record(state)
    live: dict = {}
    engines = state.engines()  # (AFD's FFN instances have no fault admin)
    for p in (q for q in state.processes if q.role == "router" or q in engines):
        try:
            live[p.name] = get_admin(p.url, "/admin/fault", state.token)
        except AdminError as exc:
            live[p.name] = {"error": str(exc)}
    return {"active": data["active"], "timeline": data["timeline"], "live": live}
