"""Entry point of one emulated process (worker instances or the router).

``python -m emulator.cluster.process worker --spec S --cluster C --instance I --port-file F``
binds an ephemeral port (no race with other runs), writes it to the port file,
serves until SIGTERM/SIGINT, then shuts down gracefully.

A worker process may host several instances (``emulation.instancesPerProcess``): ``--instance``
and ``--port-file`` (and, on a restart, ``--port``) are repeated, one per instance, in the same
order; on Kubernetes, ``--pod $(POD_NAME) --port 8000`` hosts the instances of a dense pod
(``emulator.packing``) on ports 8000, 8001, ... Each instance is its own aiohttp application on
its own port, with its own engine loop, metrics registry and identity; they share the process's
event loop, so a 2-core host runs dozens of instances on a few interpreters instead of one each.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys

from aiohttp import web

from emulator import event_loop
from emulator.atomic_file import write_atomically
from emulator.errors import SpecError


def _cluster(spec: str, name: str):
    from emulator.spec import load_clusters

    for c in load_clusters(spec):
        if c.name == name:
            return c
    raise SpecError([f"{spec}: no cluster named {name!r}"])


# A connection must finish its first request's headers within this (Go's ReadHeaderTimeout, the usual
# Slowloris defence; aiohttp has none): 800 half-sent requests would otherwise hold 800 sockets forever.
HEADER_TIMEOUT_S = 10.0
# set to a folder, every process profiles itself from SIGUSR1 on and writes <instance or router>.prof there on exit
PROFILE_ENV = "INFEMU_PROFILE_DIR"
MAX_HEADER_BYTES = 64 * 1024


class HeaderDeadline:
    """Wraps aiohttp's protocol factory: each new connection is closed unless the blank line that
    ends its first request's headers arrives within ``timeout_s`` (or 64 KiB were sent)."""

    def __init__(self, factory, timeout_s: float) -> None:
        self.factory = factory
        self.timeout_s = timeout_s

    def __call__(self) -> asyncio.Protocol:
        return _GuardedProtocol(self.factory(), self.timeout_s)


class _GuardedProtocol(asyncio.Protocol):
    """Forwards every protocol call to aiohttp's handler (whose slots forbid patching it)."""

    def __init__(self, inner, timeout_s: float) -> None:
        self.inner = inner
        self.timeout_s = timeout_s
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""
        self.received = 0
        self.done = False

    def connection_made(self, transport) -> None:
        self.inner.connection_made(transport)
        self.timer = asyncio.get_running_loop().call_later(self.timeout_s, self._expire, transport)

    def _expire(self, transport) -> None:
        if not self.done:
            transport.close()

    def data_received(self, data: bytes) -> None:
        if not self.done:
            seen = self.tail + bytes(data)  # the end of the headers may straddle two reads
            self.received += len(data)
            if b"\r\n\r\n" in seen or self.received > MAX_HEADER_BYTES:
                self.done = True  # past 64 KiB, aiohttp's own header limits answer (431/400)
                if self.timer is not None:
                    self.timer.cancel()
            else:
                self.tail = seen[-3:]
        self.inner.data_received(data)

    def eof_received(self):
        return self.inner.eof_received()

    def connection_lost(self, exc) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def build_apps(args: argparse.Namespace, instances: list[str]) -> list[web.Application]:
    """One application per hosted instance (the router: one), from one reading of the spec and peers."""
    cluster = _cluster(args.spec, args.cluster)
    if args.time_dilation is not None:  # `infemu run --time-dilation`: the launcher's choice, not the file's
        from emulator.spec import with_time_dilation

        cluster = with_time_dilation(cluster, args.time_dilation)
    if args.kind == "worker":
        from emulator.serve.app import WorkerSettings, create_app

        peers: tuple[tuple[str, str], ...] = ()
        if args.peers:
            with open(args.peers, encoding="utf-8") as fh:
                peers = tuple((p["name"], p["url"]) for p in json.load(fh))
        return [
            create_app(WorkerSettings(cluster, name, host=args.host, port=0, shaping=args.shaping, peers=peers))
            for name in instances
        ]
    from emulator.build import build_instances
    from emulator.catalog.models import get_model
    from emulator.roles import is_front
    from emulator.router.proxy import RouterSettings, create_router_app

    with open(args.backends, encoding="utf-8") as fh:
        backends = tuple((b["name"], b["role"], b["url"]) for b in json.load(fh))
    peers: list[dict] = []
    if args.peers:  # the retrievers (rag instances) among the services
        with open(args.peers, encoding="utf-8") as fh:
            peers = json.load(fh)
    dilation = cluster.spec.emulation.time_dilation
    _, setups = build_instances(cluster.spec)
    front = [s for s in setups if is_front(s.instance.role)]
    settings = RouterSettings(
        model_name=cluster.spec.model.name,
        max_model_len=front[0].engine.max_model_len if front else 0,
        policy=cluster.spec.router.policy,
        backends=backends,
        vocab_size=get_model(cluster.spec.model.name).vocab,
        block_size=front[0].engine.block_size if front else 16,
        # the router times requests in wall seconds: a dilated cluster's SLOs are D times longer
        slo_ttft_s=cluster.spec.slo.ttft_ms / 1e3 * cluster.spec.emulation.time_dilation,
        slo_tpot_s=cluster.spec.slo.tpot_ms / 1e3 * cluster.spec.emulation.time_dilation,
        resilience=cluster.spec.router,
        dilation=cluster.spec.emulation.time_dilation,
        retrievers=tuple((p["name"], p["url"]) for p in peers if p.get("role") == "rag"),
        slo_e2e_s=None if cluster.spec.slo.e2e_ms is None else cluster.spec.slo.e2e_ms / 1e3 * dilation,
    )
    return [create_router_app(settings)]


def _pod_members(args: argparse.Namespace) -> list[tuple[str, int, str | None]]:
    """Kubernetes dense mode: every instance of pod ``--pod``, on consecutive ports from ``--port``."""
    from emulator.packing import pod_members

    if args.instance or args.port_file or len(args.port or []) != 1:
        raise SpecError(["--pod hosts the pod's instances on consecutive ports: give one --port and no --instance"])
    cluster = _cluster(args.spec, args.cluster)
    try:
        names = pod_members(cluster.spec, cluster.name, args.pod)
    except KeyError:
        why = f"--pod {args.pod}: not a pod of cluster {cluster.name!r} (<cluster>-<pool>-<ordinal>)"
        raise SpecError([why]) from None
    return [(name, args.port[0] + slot, None) for slot, name in enumerate(names)]


def _members(args: argparse.Namespace) -> list[tuple[str, int, str | None]]:
    """(instance, port, port file) per hosted instance: the repeated options zipped, counts checked."""
    if args.pod:
        return _pod_members(args)
    names = args.instance or [""]
    ports = args.port or [0] * len(names)
    files = args.port_file or [None] * len(names)
    if not (len(names) == len(ports) == len(files)):
        raise SpecError(
            [
                f"--instance given {len(names)} times but --port {len(ports)} and --port-file {len(files)} times: "
                "give one of each per hosted instance, in the same order"
            ]
        )
    if args.kind == "router" and len(names) > 1:
        raise SpecError(["the router hosts no instances: drop --instance"])
    return list(zip(names, ports, files, strict=True))


async def _start_one(args: argparse.Namespace, app: web.Application, instance: str, port: int, port_file: str | None):
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    loop = asyncio.get_running_loop()
    assert runner.server is not None
    factory = HeaderDeadline(runner.server, HEADER_TIMEOUT_S)
    server = await loop.create_server(factory, args.host, port, reuse_address=True)
    bound = server.sockets[0].getsockname()[1]
    if args.kind == "worker":
        from emulator.serve.app import WORKER

        # peers pull KV from this URL: on Kubernetes the pod's IP (--advertise-url), not 0.0.0.0
        if WORKER in app:  # an engine (an FFN instance serves the expert side only)
            app[WORKER].url = args.advertise_url or f"http://{args.advertise_host or args.host}:{bound}"
    if port_file:
        write_atomically(port_file, str(bound))
    logging.getLogger("infemu").info("%s %s listening on %s:%d", args.kind, instance or "router", args.host, bound)
    return runner, server


async def serve(args: argparse.Namespace) -> None:
    members = _members(args)
    if args.advertise_url and len(members) > 1:
        raise SpecError(["--advertise-url names one instance's URL: host one instance per process with it"])
    apps = build_apps(args, [name for name, _, _ in members])
    # Garbage-collection pauses are the largest wake-up delays a step timer sees: keep the
    # start-up objects out of collection and collect the young generation less often.
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    started = [
        await _start_one(args, app, name, port, port_file)
        for app, (name, port, port_file) in zip(apps, members, strict=True)
    ]
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for runner, server in started:
        server.close()
        await runner.cleanup()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m emulator.cluster.process")
    ap.add_argument("kind", choices=["worker", "router"])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--instance", action="append", help="worker: an instance to host (repeat to host several)")
    ap.add_argument("--backends", help="router: JSON list of {name, role, url}")
    ap.add_argument(
        "--peers",
        help="JSON list of {name, role, url} of the service instances (ffn, rag, kvstore): a worker's FFN partners and"
        " KV store, the router's retrievers",
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, action="append", help="the port to bind (one per --instance; default: any)")
    ap.add_argument("--port-file", action="append", help="where to write the bound port (one per --instance)")
    ap.add_argument("--advertise-url", help="worker: the URL peers reach it at (default http://HOST:PORT)")
    ap.add_argument("--advertise-host", help="worker: the host peers reach its instances at, each on its own port")
    ap.add_argument(
        "--pod",
        help="worker on Kubernetes, dense mode: host every instance of this pod (<cluster>-<pool>-<ordinal>; "
        "spec.emulation.instancesPerProcess per pod) on consecutive ports from --port",
    )
    ap.add_argument("--shaping", choices=["inproc", "tc"], default="inproc")
    ap.add_argument("--time-dilation", type=float, help="run at this spec.emulation.timeDilation instead of the spec's")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    profile_dir = os.environ.get(PROFILE_ENV)
    profiler = None
    if profile_dir:  # a developer's look at where this process spends its CPU (benchmarks/emulation_capacity.py):
        import cProfile  # from SIGUSR1 (after start-up, when the load begins) to the exit

        profiler = cProfile.Profile()
        signal.signal(signal.SIGUSR1, lambda *_: profiler.enable())
    try:
        event_loop.run(serve(args))  # timers on time (see emulator/event_loop.py)
    except SpecError as exc:
        for line in exc.problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    finally:
        if profiler is not None:
            profiler.disable()
            os.makedirs(profile_dir, exist_ok=True)
            hosted = args.instance or ([args.pod] if args.pod else ["router"])
            profiler.dump_stats(os.path.join(profile_dir, f"{'+'.join(hosted)}.prof"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
