"""``infemu link set``: live link changes on a running local cluster, through each sender's
``/admin/link`` endpoint (the hook fault injection builds on)."""

from __future__ import annotations

import json

from emulator.cluster.admin import AdminError, post_admin
from emulator.cluster.local import RunState, running_runs
from emulator.errors import InputError

FAILED = "failed: "  # the prefix of a line for a member that could not be changed


def newest_run() -> str:
    """The newest running cluster's run directory, wherever it was started from."""
    running = running_runs()
    if not running:
        raise InputError("--run-dir: no running cluster found; start one with `infemu up --detach`")
    return running[0].run_dir


def _members(state: RunState, name: str) -> list:
    workers = state.workers()
    chosen = [p for p in workers if p.name == name or p.name.rsplit("-", 1)[0] == name]
    if not chosen:
        raise InputError(
            f"{name!r} is neither an instance nor a pool of {state.cluster}; "
            f"instances: {', '.join(p.name for p in workers)}"
        )
    return chosen


def describe(sender: str, result: dict) -> str:
    """One line per changed link, in the user's terms first (the logical rate asked for), then the wire."""
    head = f"{sender} -> {result.get('to')}"
    if result.get("reset"):
        return f"{head}: reset to the tier's own numbers"
    if result.get("cut"):
        return f"{head} ({result.get('tier')}): cut"
    logical, wire = result.get("logical_rate_bytes_per_s"), result.get("rate_bytes_per_s")
    if logical is None or wire is None:
        return f"{head}: {json.dumps(result)}"
    return (
        f"{head} ({result['tier']}): {logical / 1e9:.3g} GB/s logical, latency {result['logical_latency_us']:.3g} us"
        f" ({wire / 1e6:.3g} MB/s on the wire at byte scale {result['byte_scale']:.3g})"
    )


def set_links(
    run_dir: str | None,
    src: str | None,
    dst: str | None,
    *,
    bandwidth_factor: float | None = None,
    latency_us: float | None = None,
    cut: bool = False,
    reset: bool = False,
) -> list[str]:
    state = RunState.load(run_dir or newest_run())
    if not (cut or reset or bandwidth_factor is not None or latency_us is not None):
        raise InputError("link set: give --bandwidth-factor, --latency-us, --cut or --reset")
    if src is None and dst is None and reset:  # every link of every worker back to its tier
        out = []
        for w in state.engines():  # (AFD's FFN instances have no link admin)
            try:
                post_admin(w.url, "/admin/link", {"reset": True, "all": True}, state.token)
                out.append(f"{w.name}: every link reset to its tier")
            except AdminError as exc:
                out.append(f"{FAILED}{w.name}: {exc}")
        return out
    if src is None or dst is None:
        raise InputError("link set: give --from and --to (only --reset may go without them: it resets every link)")
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
                out.append(describe(s.name, result))
    return out
