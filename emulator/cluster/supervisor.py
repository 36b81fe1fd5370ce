"""Restarts the processes of a local cluster that die, as a kubelet restarts a pod's container.

A dead worker or router is started again with the same command on the same port (its
URL, and so the router's backend list and the clients' endpoint, stay valid), after a
back-off that doubles with each restart in a row — 1 s, 2 s, 4 s ... capped at 30 s
(Kubernetes' CrashLoopBackOff, at emulation scale: its 10 s base would dominate a
minute-long chaos run) — and resets once the process has stayed up for 60 s. The router
re-admits a restarted worker through its health check. A process that hosts several instances
(``emulation.instancesPerProcess``) is watched and restarted as one, every instance on its port.

In-process (``infemu up``, ``infemu run``) it is a thread; for ``infemu up --detach`` it is
its own process, ``python -m emulator.cluster.supervisor RUN_DIR``, stopped first by
``infemu down``.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from emulator.cluster.local import ProcessInfo, RunState, _alive, http_status, launch

log = logging.getLogger("infemu.supervisor")
BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 30.0
STABLE_S = 60.0
POLL_S = 0.1


@dataclass
class _Watch:
    infos: list[ProcessInfo]  # the instances the process hosts (one, or several: instancesPerProcess)
    started: float
    streak: int = 0  # restarts in a row without STABLE_S of uptime
    due: float | None = None  # when the pending restart happens

    @property
    def label(self) -> str:
        return ", ".join(i.name for i in self.infos)


def restart_command(infos: list[ProcessInfo]) -> list[str]:
    """The process's command, each hosted instance pinned to the port it had (peers and the router keep
    its URL): one ``--port`` per instance, in the order of its ``--instance`` options."""
    cmd = list(infos[0].cmd)
    if "--port" not in cmd and all(i.port for i in infos):
        for info in infos:
            cmd += ["--port", str(info.port)]
    return cmd


class Supervisor:
    def __init__(self, state: RunState, procs: dict[str, subprocess.Popen] | None = None) -> None:
        self.state = state
        self.procs = procs if procs is not None else {}  # children of this process: reaped here
        now = time.monotonic()
        by_pid: dict[int, list[ProcessInfo]] = {}
        for p in state.processes:
            if p.cmd and p.role != "supervisor":
                by_pid.setdefault(p.pid, []).append(p)
        self.watches = {infos[0].name: _Watch(infos, now) for infos in by_pid.values()}
        self.events: list[tuple[float, str, str]] = []  # (monotonic time, instance, "died"|"restarted")
        self.awaiting_ready: list[_Watch] = []  # restarted, not yet ready: then ``on_ready`` hears of them
        # told the names of instances a restart brought back, once they answer ready; each returns what it
        # did: the faults they carried go back on (a slow GPU or a damaged link outlives the process) —
        # the live ones here, a run's schedule through its fault runner (emulator/run.py adds it)
        self.on_ready: list[Callable[[set[str]], list[str]]] = [self._reapply_live_faults]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _dead(self, w: _Watch) -> bool:
        first = w.infos[0]
        proc = self.procs.get(first.name)
        if proc is not None and proc.pid == first.pid:
            return proc.poll() is not None
        return not _alive(first.pid)

    def poll_once(self) -> list[str]:
        """One look at every process; returns what happened (for the foreground `infemu up`)."""
        out = []
        now = time.monotonic()
        with self._lock:
            for w in self.watches.values():
                if w.due is None:
                    if not self._dead(w):
                        if now - w.started >= STABLE_S:
                            w.streak = 0
                        continue
                    delay = min(BACKOFF_BASE_S * 2**w.streak, BACKOFF_CAP_S)
                    w.due = now + delay
                    self.events.extend((now, i.name, "died") for i in w.infos)
                    out.append(f"{w.label} (pid {w.infos[0].pid}) died; restarting in {delay:.0f} s")
                    log.warning(out[-1])
                elif now >= w.due:
                    proc = launch(restart_command(w.infos), w.infos[0].log, self.state.token)
                    for info in w.infos:
                        self.procs[info.name] = proc
                        info.pid = proc.pid
                        info.restarts += 1
                    w.streak += 1
                    w.started = now
                    w.due = None
                    self.state.save()
                    self.events.extend((now, i.name, "restarted") for i in w.infos)
                    out.append(f"{w.label} restarted (pid {proc.pid}, restart {w.infos[0].restarts})")
                    log.warning(out[-1])
                    if w.infos[0].role != "router":
                        self.awaiting_ready.append(w)
            out += self._notify_ready()
        return out

    def _notify_ready(self) -> list[str]:
        """Tell ``on_ready`` which restarted workers answer ready now."""
        ready = [w for w in self.awaiting_ready if all(http_status(f"{i.url}/ready", 0.5) == 200 for i in w.infos)]
        if not ready:
            return []
        self.awaiting_ready = [w for w in self.awaiting_ready if w not in ready]
        names = {i.name for w in ready for i in w.infos}
        lines: list[str] = []
        for hook in self.on_ready:
            try:
                lines += hook(names)
            except Exception as exc:  # the supervisor goes on restarting whatever goes wrong here
                lines.append(f"re-applying faults after a restart failed: {exc}")
        for line in lines:
            log.warning(line)
        return lines

    def _reapply_live_faults(self, restarted: set[str]) -> list[str]:
        """The faults injected by hand (`infemu fault inject`) that the restarted instances carried."""
        from emulator.faults.live import reapply

        return reapply(self.state.run_dir, restarted)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="infemu-supervisor", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(POLL_S):
            self.poll_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def spawn_detached(state: RunState) -> ProcessInfo:
    """The supervisor of an `infemu up --detach` cluster, as its own process recorded in the state."""
    log_path = os.path.join(state.run_dir, "logs", "supervisor.log")
    cmd = [sys.executable, "-m", "emulator.cluster.supervisor", state.run_dir]
    proc = launch(cmd, log_path, state.token)
    info = ProcessInfo("supervisor", "supervisor", proc.pid, log=log_path)
    state.processes.insert(0, info)
    state.save()
    return info


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = RunState.load(args[0])
    sup = Supervisor(state)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(POLL_S):
        sup.poll_once()
    return 0


if __name__ == "__main__":
    sys.exit(main())
