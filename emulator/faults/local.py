"""Carrying out faults on a running local cluster, and playing a schedule of them during a run.

Each fault kind maps onto something real: ``kill`` sends SIGKILL to the instance's process
group (its supervisor restarts it); ``hang`` and ``slow`` go to the worker's ``/admin/fault``
(no step and no answer with connections left open; every step k times longer); ``link``
changes the sender's side through ``/admin/link`` (rate factor, added latency, cut);
``partition`` cuts both directions between two groups, and when a group names the router,
the router stops reaching the other group (``/admin/fault`` on the router). Every change is
also posted to the router as an ``infemu_fault_active`` annotation for Prometheus.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field

from emulator.cluster.admin import AdminError, post_admin
from emulator.cluster.local import RunState
from emulator.faults import record
from emulator.faults.schedule import ROUTER, Fault, admin_calls, phases


class LocalInjector:
    def __init__(self, state: RunState) -> None:
        self.state = state

    def _proc(self, name: str):
        return next(p for p in self.state.processes if p.name == name)

    def apply(self, fault: Fault, on: bool, cut: bool | None = None) -> list[str]:
        """Start (``on``) or clear one fault; ``cut`` overrides a link fault's cut (flapping).
        Returns one line per member changed, failures included: one unreachable member must not
        stop the others."""
        lines: list[str] = []
        if fault.kind == "kill" and on:
            for name in fault.instances:
                pid = self._proc(name).pid
                try:
                    os.killpg(pid, signal.SIGKILL)
                    lines.append(f"{name}: killed (pid {pid})")
                except (ProcessLookupError, PermissionError) as exc:
                    lines.append(f"{name}: failed: {exc}")
        for call in admin_calls(fault, on, cut):
            url = self.state.router if call.target == ROUTER else self._proc(call.target).url
            try:
                post_admin(url, call.path, call.body, self.state.token)
                result = f"{call.label}: ok"
            except AdminError as exc:  # (the router itself may be the one killed)
                result = f"{call.label}: failed: {exc}"
            if call.reported:
                lines.append(result)
        return lines


@dataclass
class _Active:
    fault: Fault
    started: float  # wall clock (perf_counter)
    ends: float | None
    switches: list[tuple[float, bool]] = field(default_factory=list)  # flapping: (wall time, cut)
    cleared: bool = False
    cut_now: bool | None = None  # a flapping link's current phase
    down: set[str] = field(default_factory=set)  # a kill's instances the supervisor has not seen back yet


class FaultRunner:
    """Plays ``faults`` during a run, in a thread: each starts at its time (emulated seconds after
    ``t0``, times the dilation) or once ``sent()`` requests were sent, and is cleared when its duration
    is over; a kill is over once the supervisor reports every instance it killed back and ready
    (``reapply``). The timeline it records (emulated seconds since ``t0``) feeds the accounting."""

    def __init__(self, injector: LocalInjector, faults: list[Fault], dilation: float, sent, run_dir: str) -> None:
        self.injector = injector
        self.pending = list(faults)
        self.dilation = dilation
        self.sent = sent
        self.run_dir = run_dir
        self.active: list[_Active] = []
        self.timeline: list[dict] = []
        self.log: list[str] = []
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="infemu-faults", daemon=True)
        self._lock = threading.Lock()  # the supervisor's thread calls ``reapply``
        self._saved: tuple[int, int, int] | None = None  # what the file held when last written

    def start(self, t0: float) -> None:
        self.t0 = t0
        self._thread.start()

    def _emulated(self, wall: float) -> float:
        return (wall - self.t0) / self.dilation

    def _loop(self) -> None:
        while not self._stop.wait(0.02):
            self.tick(time.perf_counter())

    def tick(self, now: float) -> None:
        with self._lock:
            self._tick(now)

    def _tick(self, now: float) -> None:
        for f in list(self.pending):
            due = (f.at_s is not None and now >= self.t0 + f.at_s * self.dilation) or (
                f.after_requests is not None and self.sent() >= f.after_requests
            )
            if due:
                self.pending.remove(f)
                self._begin(f, now)
        for a in self.active:
            if a.cleared:
                continue
            while a.switches and now >= a.switches[0][0]:
                _, a.cut_now = a.switches.pop(0)
                self.log += self.injector.apply(a.fault, True, cut=a.cut_now)
            if a.fault.kind != "kill" and a.ends is not None and now >= a.ends:  # (a kill ends in ``reapply``)
                self.log += self.injector.apply(a.fault, False)
                self._end(a, now)
        # written when something happened (here or in ``reapply``), not every 20 ms tick: each write takes
        # the record's lock and reads it first
        changed = (len(self.log), len(self.timeline), sum(e["end_s"] is not None for e in self.timeline))
        if changed != self._saved:
            self._saved = changed
            self._save()

    def reapply(self, restarted: set[str]) -> list[str]:
        """The supervisor's word that these instances were restarted and answer ready: the faults of the
        schedule they carry, not yet over, lost it with their process and go back on, as a GPU's
        slowness or a link's damage outlives a restart (a member that was down as its fault began gets
        it now too); a kill whose instances are all back is over. The supervisor is the one that
        watches readiness: the runner's own 0.5 s probes once held up its ticks while a kill lasted."""
        lines: list[str] = []
        with self._lock:
            for a in self.active:
                if a.cleared:
                    continue
                if a.fault.kind == "kill":  # over once every instance it killed is back and ready
                    a.down -= restarted
                    if not a.down:
                        self._end(a, time.perf_counter())
                    continue
                moved = sorted(a.fault.members & restarted)
                if not moved:
                    continue
                lines += [f"{a.fault.name}: re-applied after {', '.join(moved)} restarted"]
                lines += self.injector.apply(a.fault, True, cut=a.cut_now)
            self.log += lines
        return lines

    def _begin(self, f: Fault, now: float) -> None:
        ends = None if f.duration_s is None else now + f.duration_s * self.dilation
        a = _Active(f, now, ends)
        switches = [(now + t * self.dilation, cut) for t, cut in phases(f, 0.0, f.duration_s or 1e9)]
        a.switches = switches[1:]  # a flapping link: cut, restored, cut ... every half period
        a.cut_now = switches[0][1]
        if f.kind == "kill":
            a.down = set(f.instances)
        self.active.append(a)
        self.log += self.injector.apply(f, True, cut=a.cut_now)
        self.timeline.append(
            {
                "name": f.name,
                "kind": f.kind,
                "targets": list(f.instances) or [list(g) for g in f.groups],
                "start_s": self._emulated(now),
                "end_s": None,
            }
        )

    def _end(self, a: _Active, now: float) -> None:
        a.cleared = True
        for entry in self.timeline:
            if entry["name"] == a.fault.name and entry["end_s"] is None:
                entry["end_s"] = self._emulated(now)

    def stop(self) -> list[dict]:
        """Clear what is still active (the cluster may outlive the run) and return the timeline."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)
        now = time.perf_counter()
        with self._lock:
            for a in self.active:
                if not a.cleared:
                    if a.fault.kind != "kill":
                        self.log += self.injector.apply(a.fault, False)
                    self._end(a, now)
            self._save()
        return self.timeline

    def _save(self) -> None:
        """The schedule's part of the record; the faults injected by hand meanwhile keep theirs."""
        with record.updating(self.run_dir) as data:
            data["schedule"] = self.timeline
            data["log"] = self.log[-200:]
