"""``infemu link set``: live link changes on a running local cluster, through each sender's
``/admin/link`` endpoint (the hook fault injection builds on)."""

from __future__ import annotations

import json
import os

from emulator.cluster.admin import AdminError, post_admin
from emulator.cluster.local import RUNS_DIR, RunState
from emulator.errors import InputError

FAILED = "failed: "  # the prefix of a line for a member that could not be changed


def newest_run() -> str:
    runs = (
        sorted((os.path.join(RUNS_DIR, d) for d in os.listdir(RUNS_DIR)), key=os.path.getmtime)
        if os.path.isdir(RUNS_DIR)
        else []
    )
    if not runs:
        raise InputError("--run-dir: no cluster runs under .infemu/runs; start one with `infemu up --detach`")
    return runs[-1]


def _members(state: RunState, name: str) -> list:
    workers = [p for p in state.processes if p.role != "router"]
    chosen = [p for p in workers if p.name == name or p.name.rsplit("-", 1)[0] == name]
    if not chosen:
        raise InputError(
            f"{name!r} is neither an instance nor a pool of {state.cluster}; "
            f"instances: {', '.join(p.name for p in workers)}"
        )
    return chosen


def set_links(
    run_dir: str | None,
    src: str,
    dst: str,
    *,
    bandwidth_factor: float | None = None,
    latency_us: float | None = None,
    cut: bool = False,
    reset: bool = False,
) -> list[str]:
    state = RunState.load(run_dir or newest_run())
    if not (cut or reset or bandwidth_factor is not None or latency_us is not None):
        raise InputError("link set: give --bandwidth-factor, --latency-us, --cut or --reset")
    body: dict = {"reset": reset, "cut": cut}
    if bandwidth_factor is not None:
        body["bandwidth_factor"] = bandwidth_factor
    if latency_us is not None:
        body["latency_us"] = latency_us
    out = []
    a, b = _members(state, src), _members(state, dst)
    for sender, receivers in ((a, b), (b, a)):
        for s in sender:
            for r in receivers:
                if s.name == r.name:
                    continue
                # one dead member must not stop the others: combined faults are scripted with this
                try:
                    result = post_admin(s.url, "/admin/link", {**body, "to": r.name}, state.token)
                except AdminError as exc:
                    out.append(f"{FAILED}{s.name} -> {r.name}: {exc}")
                    continue
                out.append(f"{s.name} -> {r.name}: {json.dumps(result)}")
    return out
