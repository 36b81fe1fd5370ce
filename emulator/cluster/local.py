"""A whole cluster as local processes: start, wait until ready, stop without orphans.

State lives in a run directory (``.infemu/runs/<cluster>-<time>``): ``state.json``
with every process and URL, one log file per instance, and the port files the
processes write once bound. ``infemu down`` reads it to stop a detached cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from emulator.atomic_file import write_atomically
from emulator.errors import SpecError
from emulator.roles import get_role
from emulator.serve.internal import TOKEN_ENV, internal_headers, new_token

RUNS_DIR = os.path.join(".infemu", "runs")
START_TIMEOUT_S = 60.0


if TYPE_CHECKING:
    from emulator.cluster.supervisor import Supervisor


class ClusterStartError(SpecError):
    """An instance failed to start: names it and why; everything already started is stopped."""


@dataclass
class ProcessInfo:
    name: str
    role: str
    pid: int
    url: str = ""
    log: str = ""
    cmd: list[str] = field(default_factory=list)  # how to start it again (the supervisor restarts it)
    restarts: int = 0

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1]) if self.url else 0


@dataclass
class RunState:
    cluster: str
    spec: str
    run_dir: str
    router: str = ""
    processes: list[ProcessInfo] = field(default_factory=list)
    shaping: str = "inproc"
    run_id: str = ""  # names the tc backend's namespaces, veths and bridge
    path_overhead_s: float = 0.0  # the emulation's own HTTP round trip, measured at start
    token: str = ""  # the cluster's internal token (serve/internal.py): `infemu link set` needs it
    time_dilation: float | None = None  # `infemu run --time-dilation`'s override (None: the spec's)

    def workers(self) -> list[ProcessInfo]:
        """The instances' processes: not the router, not a detached supervisor."""
        return [p for p in self.processes if p.role not in ("router", "supervisor")]

    def engines(self) -> list[ProcessInfo]:
        """The workers that run an engine (queues, KV, the admin endpoints); AFD's FFN instances do not."""
        return [p for p in self.workers() if get_role(p.role).engine]

    def to_json(self) -> dict:
        return {
            "router": self.router,
            "instances": [{"name": p.name, "role": p.role, "url": p.url} for p in self.workers()],
        }

    def save(self) -> None:
        # owner-only: the file holds the cluster's internal token
        write_atomically(os.path.join(self.run_dir, "state.json"), json.dumps(asdict(self), indent=2), 0o600)

    @classmethod
    def load(cls, run_dir: str) -> RunState:
        with open(os.path.join(run_dir, "state.json"), encoding="utf-8") as fh:
            raw = json.load(fh)
        raw["processes"] = [ProcessInfo(**p) for p in raw["processes"]]
        return cls(**raw)


def http_status(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # loopback only
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return 0


PROBES = 25


def _probe_once(router: str, model: str, token: str | None) -> float:
    body = json.dumps({"model": model, "prompt": "x", "max_tokens": 1, "stream": True}).encode()
    req = urllib.request.Request(
        f"{router}/v1/completions",
        data=body,
        headers={"Content-Type": "application/json", "X-Infemu-Probe": "1", **internal_headers(token)},
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=5) as resp:  # loopback only
        for line in resp:
            if line.startswith(b"data: "):
                return time.perf_counter() - t0
    raise OSError("the probe stream carried no data")


def calibrate_path(router: str, model: str, token: str | None = None) -> float:
    """The emulation's own HTTP round trip, client -> router -> worker -> router -> client, measured
    with probe requests the workers answer at once (median of 25); the router passes it to the
    workers, which take it out of the modelled API-server time (``emulator.serve.api_path``)."""
    samples = []
    for _ in range(PROBES):
        try:
            samples.append(_probe_once(router, model, token))
        except (OSError, urllib.error.URLError):
            continue
    if not samples:
        print(
            f"infemu: path calibration: no probe reached {router}; emulated latencies include the HTTP path",
            file=sys.stderr,
        )
        return 0.0
    seconds = float(sorted(samples)[len(samples) // 2])
    req = urllib.request.Request(
        f"{router}/admin/path-overhead",
        data=json.dumps({"seconds": seconds}).encode(),
        headers={"Content-Type": "application/json", **internal_headers(token)},
    )
    try:
        with urllib.request.urlopen(req, timeout=5):
            pass
    except (OSError, urllib.error.URLError) as exc:
        print(
            f"infemu: path calibration: the router refused the measurement ({exc}); emulated latencies "
            "include the HTTP path",
            file=sys.stderr,
        )
        return 0.0
    return seconds


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return " | ".join(line.strip() for line in fh.readlines()[-lines:])
    except OSError:
        return ""


def launch(cmd: list[str], log_path: str, token: str) -> subprocess.Popen:
    """One emulated process in its own session (its group is stopped as one), logging to its file."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, TOKEN_ENV: token},  # the cluster's internal hop (serve/internal.py)
        )


def _registry() -> str:
    """Where every run leaves a pointer, whatever folder it was started from (XDG state home)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "infemu", "runs")


def register_run(run_dir: str) -> None:
    """Leave a pointer to the run in the user's registry, so `infemu status`, `down`, `link set` and
    `fault` find it from any folder (and runs given ``--run-dir``)."""
    key = hashlib.sha256(run_dir.encode()).hexdigest()[:12]
    try:
        os.makedirs(_registry(), exist_ok=True)
        with open(os.path.join(_registry(), f"{os.path.basename(run_dir)}-{key}.link"), "w", encoding="utf-8") as fh:
            fh.write(run_dir)
    except OSError:
        pass  # no writable home (a read-only container): the run is still found from its own folder


def known_runs() -> list[str]:
    """Every run directory under ./.infemu/runs and every one the registry points at."""
    out: list[str] = []
    for folder in (RUNS_DIR, _registry()):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            path = os.path.join(folder, entry)
            if entry.endswith(".link"):
                try:
                    with open(path, encoding="utf-8") as fh:
                        target = fh.read().strip()
                except OSError:
                    continue
                if os.path.isfile(os.path.join(target, "state.json")):
                    out.append(target)
                else:
                    try:
                        os.unlink(path)  # the run directory is gone: so is its pointer
                    except OSError:
                        pass
            elif os.path.isdir(path):
                out.append(os.path.abspath(path))
    return list(dict.fromkeys(out))


def running_runs() -> list[RunState]:
    """The runs with a live router or worker, newest first."""
    states = []
    for d in known_runs():
        try:
            state = RunState.load(d)
        except (OSError, ValueError, TypeError):
            continue
        if any(_alive(p.pid) and _is_ours(p.pid) for p in state.processes):
            states.append((os.path.getmtime(os.path.join(d, "state.json")), state))
    return [s for _, s in sorted(states, key=lambda x: -x[0])]


class LocalCluster:
    def __init__(
        self,
        spec_path: str,
        cluster_name: str,
        run_dir: str | None = None,
        detach: bool = False,
        shaping: str = "auto",
        cluster=None,
    ) -> None:
        self.spec_path = os.path.abspath(spec_path)
        self.cluster_name = cluster_name
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.run_dir = os.path.abspath(run_dir or os.path.join(RUNS_DIR, f"{cluster_name}-{stamp}-{os.getpid()}"))
        self.detach = detach
        self.state = RunState(cluster_name, self.spec_path, self.run_dir)
        self._procs: dict[str, subprocess.Popen] = {}
        self.token = new_token()
        self.state.token = self.token
        self.shaping_request = shaping
        self.cluster = cluster  # an already-overridden cluster; processes still read the spec file
        if cluster is not None:  # the tools that time things in emulated seconds read it (faults/live.py)
            self.state.time_dilation = cluster.spec.emulation.time_dilation
        self.shaping_reason = ""
        self._hosts: dict = {}
        self.supervisor: Supervisor | None = None

    def _choose_shaping(self, packed: bool = False) -> str:
        """``packed``: several instances per worker process; tc shapes a namespace per instance, so
        packed instances pace their links in the process instead (and an explicit tc request is refused)."""
        from emulator.net import tc

        if self.shaping_request == "inproc":
            self.shaping_reason = "in-process pacing (requested)"
            return "inproc"
        if packed:
            if self.shaping_request == "tc":
                raise ClusterStartError(
                    [
                        "--shaping tc shapes one network namespace per instance: set spec.emulation."
                        "instancesPerProcess to 1, or use --shaping inproc"
                    ]
                )
            self.shaping_reason = "in-process pacing (several instances per process: emulation.instancesPerProcess)"
            return "inproc"
        ok, why = tc.available()
        if ok:
            self.shaping_reason = f"kernel HTB/TBF in network namespaces ({why})"
            return "tc"
        if self.shaping_request == "tc":
            raise ClusterStartError([f"--shaping tc: {why}; run as root or use --shaping inproc"])
        self.shaping_reason = f"in-process pacing (tc unavailable: {why})"
        return "inproc"

    def _spawn(self, kind: str, name: str, role: str, extra: list[str], netns: str | None = None) -> ProcessInfo:
        return self._spawn_hosting(kind, [(name, role)], extra, netns)[0]

    def _spawn_hosting(
        self, kind: str, members: list[tuple[str, str]], extra: list[str], netns: str | None = None
    ) -> list[ProcessInfo]:
        """One process hosting ``members`` (instance name, role): one ProcessInfo each, sharing the pid,
        the command and the log; each instance binds its own port and writes its own port file."""
        names = [n for n, _ in members]
        log_name = names[0] if len(names) == 1 else f"{names[0]}..{names[-1]}"
        log_path = os.path.join(self.run_dir, "logs", f"{log_name}.log")
        per_instance: list[str] = []
        for name in names:
            port_file = os.path.join(self.run_dir, "ports", name)
            if os.path.exists(port_file):  # a reused run folder: an earlier run's port must not be read as this one's
                os.remove(port_file)
            per_instance += (["--instance", name] if kind == "worker" else []) + ["--port-file", port_file]
        cmd = [
            *(["ip", "netns", "exec", netns] if netns else []),
            sys.executable,
            "-m",
            "emulator.cluster.process",
            kind,
            "--spec",
            self.spec_path,
            "--cluster",
            self.cluster_name,
            *per_instance,
            *extra,
            # an overridden cluster (`infemu run --time-dilation`) runs at its own dilation, not the file's
            *(["--time-dilation", repr(self.cluster.spec.emulation.time_dilation)] if self.cluster is not None else []),
        ]
        proc = launch(cmd, log_path, self.token)
        infos = []
        for name, role in members:
            self._procs[name] = proc
            infos.append(ProcessInfo(name, role, proc.pid, log=log_path, cmd=cmd))
        self.state.processes.extend(infos)
        self.state.save()
        return infos

    def _wait_ready(self, infos: list[ProcessInfo]) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = {i.name: i for i in infos}
        while pending:
            for name, info in list(pending.items()):
                proc = self._procs[name]
                code = proc.poll()
                if code is not None:
                    raise ClusterStartError(
                        [
                            f"instance {name} exited with code {code} while starting: "
                            f"{_tail(info.log) or 'no output'} (log: {info.log})"
                        ]
                    )
                port_file = os.path.join(self.run_dir, "ports", name)
                if not info.url and os.path.exists(port_file):
                    host = self._hosts[name].address if name in self._hosts else "127.0.0.1"
                    with open(port_file, encoding="utf-8") as fh:
                        info.url = f"http://{host}:{fh.read().strip()}"
                if info.url and http_status(f"{info.url}/ready") == 200:
                    del pending[name]
            if time.monotonic() > deadline:
                raise ClusterStartError(
                    [f"instance {n} not ready after {START_TIMEOUT_S:.0f} s (log: {i.log})" for n, i in pending.items()]
                )
            time.sleep(0.05)
        self.state.save()

    def start(self) -> RunState:
        from emulator.build import build_instances
        from emulator.spec import load_clusters

        cluster = self.cluster or next((c for c in load_clusters(self.spec_path) if c.name == self.cluster_name), None)
        if cluster is None:
            raise SpecError([f"{self.spec_path}: no cluster named {self.cluster_name!r}"])
        topo, setups = build_instances(cluster.spec)
        for sub in ("logs", "ports"):
            os.makedirs(os.path.join(self.run_dir, sub), exist_ok=True)
        register_run(self.run_dir)
        self.state.shaping = self._choose_shaping(packed=cluster.spec.emulation.instances_per_process > 1)
        try:
            if self.state.shaping == "tc":
                self._build_network(cluster, topo, setups)
            # services first (AFD's FFN instances, retrievers, the KV store): engines and router get their URLs
            members = [i for i in topo.instances if not get_role(i.role).engine]
            peers = [info for i in members for info in self._spawn_workers([(i.name, i.role)])]
            self._wait_ready(peers)
            peers_file = os.path.join(self.run_dir, "peers.json")
            with open(peers_file, "w", encoding="utf-8") as fh:
                json.dump([{"name": w.name, "role": w.role, "url": w.url} for w in peers], fh)
            per = cluster.spec.emulation.instances_per_process
            workers = [
                info
                for i in range(0, len(setups), per)
                for info in self._spawn_workers(
                    [(s.instance.name, s.instance.role) for s in setups[i : i + per]],
                    ["--peers", peers_file] if peers else [],
                )
            ]
            self._wait_ready(workers)
            backends = [{"name": w.name, "role": w.role, "url": w.url} for w in workers]
            backends_file = os.path.join(self.run_dir, "backends.json")
            with open(backends_file, "w", encoding="utf-8") as fh:
                json.dump(backends, fh)
            router = self._spawn(
                "router", "router", "router", ["--backends", backends_file, *(["--peers", peers_file] if peers else [])]
            )
            self._wait_ready([router])
            self.state.router = router.url
            self.state.path_overhead_s = calibrate_path(router.url, cluster.spec.model.name, self.token)
            self.state.save()
        except BaseException:
            self.stop()
            raise
        return self.state

    def _spawn_workers(self, members: list[tuple[str, str]], more: list[str] | None = None) -> list[ProcessInfo]:
        """One worker process for ``members``; with tc shaping each instance has its own namespace, so
        the start refuses to pack several into one process (``_choose_shaping``)."""
        extra = ["--shaping", self.state.shaping, *(more or [])]
        host = self._hosts.get(members[0][0])
        if host is not None:
            extra += ["--host", host.address]
        return self._spawn_hosting("worker", members, extra, host.netns if host else None)

    def _build_network(self, cluster, topo, setups) -> None:
        """tc backend: a namespace per instance on a private bridge, each with its static tree."""
        from emulator.net.plan import link_plan
        from emulator.net.tc import TcNetwork, TierClass

        self.state.run_id = os.urandom(3).hex()
        self.state.save()  # recorded before anything exists, so `infemu down` can always clean up
        net = TcNetwork(self.state.run_id)
        self._hosts = net.create([i.name for i in topo.instances])  # engines and AFD's FFN instances
        for inst in topo.instances:
            plan = link_plan(cluster.spec, topo, inst)
            classes = [TierClass(p.tier.kind, p.wire_rate, 10 * (i + 1)) for i, p in enumerate(plan.values())]
            net.shape(inst.name, classes)

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop every process and remove the network. Ctrl-C and SIGTERM wait until it is done (a second
        Ctrl-C during start-up once left namespaces, a bridge and veths behind); they are delivered after."""
        masked = threading.current_thread() is threading.main_thread()
        if masked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            if self.supervisor is not None:
                self.supervisor.stop()
            stop_processes([p.pid for p in self.state.processes], timeout_s)
            for proc in self._procs.values():
                try:
                    proc.wait(timeout=0.1)
                except subprocess.TimeoutExpired:
                    pass
            if self.state.run_id:
                from emulator.net.tc import cleanup

                cleanup(self.state.run_id)
        finally:
            if masked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})

    def supervise(self) -> Supervisor:
        """Restart processes that die, in a thread, until ``stop``."""
        from emulator.cluster.supervisor import Supervisor

        self.supervisor = Supervisor(self.state, self._procs)
        self.supervisor.start()
        return self.supervisor

    @property
    def children(self) -> dict[str, subprocess.Popen]:
        """The processes this launcher started, by instance name (a supervisor reaps them)."""
        return self._procs

    def dead_processes(self) -> list[tuple[str, int]]:
        return [(n, p.returncode) for n, p in self._procs.items() if p.poll() is not None]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
            return fh.read().split(") ", 1)[1].split(" ", 1)[0] != "Z"
    except OSError:
        return False


def _is_ours(pid: int) -> bool:
    """Guard against PID reuse: only stop processes that run infemu's entry point."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
        return b"emulator.cluster.process" in cmdline or b"emulator.cluster.supervisor" in cmdline
    except OSError:
        return False


def stop_processes(pids: list[int], timeout_s: float = 10.0) -> None:
    """SIGTERM each process group, wait, then SIGKILL what is left."""
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def down(run_dir: str | None = None) -> list[str]:
    """Stop detached clusters: one run directory, or every run under .infemu/runs. Returns what was stopped."""
    dirs = [run_dir] if run_dir else known_runs()
    stopped = []
    for d in dirs:
        try:
            state = RunState.load(d)
        except (OSError, ValueError, TypeError):
            continue
        # the supervisor first: it would restart what is being stopped
        supervisors = [p.pid for p in state.processes if p.role == "supervisor" and _alive(p.pid) and _is_ours(p.pid)]
        stop_processes(supervisors)
        pids = [p.pid for p in state.processes if p.role != "supervisor" and _alive(p.pid) and _is_ours(p.pid)]
        if pids or supervisors:
            stop_processes(pids)
            stopped.append(f"{state.cluster} ({d}): {len(pids) + len(supervisors)} processes stopped")
        if state.run_id:
            from emulator.net.tc import cleanup

            removed = cleanup(state.run_id)
            if removed:
                stopped.append(f"{state.cluster} ({d}): removed {', '.join(removed)}")
    return stopped
