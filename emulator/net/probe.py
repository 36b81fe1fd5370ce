"""Measured transfers through either shaping backend: what ``infemu doctor``, the link tests and
``benchmarks/link_accuracy.py`` run.

A transfer is (tier kind, wire rate, wire bytes, latency). Several run at once, one per tier, so
the measurement includes the backends' isolation between tiers; with two on the same tier, it
measures sharing. ``inproc`` sends through ``PacedLink``s over loopback TCP; ``tc`` builds two
namespaces, shapes the sender's egress with the static tree and runs sender processes marked
with the tier's TOS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

from emulator.net.inproc import PacedLink


@dataclass(frozen=True)
class Transfer:
    kind: str  # scale-up | scale-out | pcie: selects the class (tc) or the link (inproc)
    wire_rate: float  # payload bytes/s the tier's class is shaped to
    nbytes: int
    latency_s: float = 0.0

    @property
    def expected_s(self) -> float:
        return self.latency_s + self.nbytes / self.wire_rate


# ---- inproc --------------------------------------------------------------------------------


async def _inproc(transfers: list[Transfer]) -> list[float]:
    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.read(1 << 20):
                pass
        except (asyncio.CancelledError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(sink, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    links: dict[str, PacedLink] = {}
    for t in transfers:
        links.setdefault(t.kind, PacedLink(t.kind, t.wire_rate, t.latency_s))

    async def one(t: Transfer) -> float:
        _, writer = await asyncio.open_connection("127.0.0.1", port)

        async def write(chunk: bytes) -> None:
            writer.write(chunk)
            await writer.drain()

        took = await links[t.kind].send(t.nbytes, write)
        writer.close()
        await writer.wait_closed()
        return took

    try:
        return list(await asyncio.gather(*(one(t) for t in transfers)))
    finally:
        server.close()
        await server.wait_closed()


# ---- tc ------------------------------------------------------------------------------------


def _tc(transfers: list[Transfer]) -> list[float]:
    from emulator.net.tc import TIER_TOS, TcNetwork, TierClass, cleanup

    run_id = os.urandom(3).hex()
    net = TcNetwork(run_id)
    try:
        hosts = net.create(["tx", "rx"])
        kinds = {}
        for t in transfers:
            kinds.setdefault(t.kind, t.wire_rate)
        net.shape("tx", [TierClass(k, rate, 10 * (i + 1)) for i, (k, rate) in enumerate(kinds.items())])
        port = 9471
        recv = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                hosts["rx"].netns,
                sys.executable,
                "-m",
                "emulator.net.probe",
                "recv",
                "--port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            senders = [
                subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        hosts["tx"].netns,
                        sys.executable,
                        "-m",
                        "emulator.net.probe",
                        "send",
                        "--host",
                        hosts["rx"].address,
                        "--port",
                        str(port),
                        "--tos",
                        str(TIER_TOS[t.kind]),
                        "--bytes",
                        str(t.nbytes),
                        "--latency",
                        repr(t.latency_s),
                        "--start-at",
                        repr(time.time() + 0.5),
                    ],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                for t in transfers
            ]
            return [float(json.loads(p.communicate(timeout=600)[0])["seconds"]) for p in senders]
        finally:
            recv.kill()
            recv.wait()
    finally:
        cleanup(run_id)


def measure(backend: str, transfers: list[Transfer]) -> list[float]:
    """Seconds each transfer took, all started together."""
    if backend == "inproc":
        return asyncio.run(_inproc(transfers))
    if backend == "tc":
        return _tc(transfers)
    raise ValueError(f"unknown backend {backend!r}")


# ---- the processes the tc measurement runs in its namespaces ---------------------------------


def _recv(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen(64)
    import threading

    def drain(conn: socket.socket) -> None:
        while conn.recv(1 << 20):
            pass
        conn.sendall(b"k")
        conn.close()

    while True:
        conn, _ = srv.accept()
        threading.Thread(target=drain, args=(conn,), daemon=True).start()


def _send(host: str, port: int, tos: int, nbytes: int, latency: float, start_at: float) -> float:
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, tos)
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    t0 = time.perf_counter()
    if latency > 0:
        time.sleep(latency)
    buf = bytes(1 << 16)
    left = nbytes
    while left > 0:
        left -= sock.send(buf[: min(len(buf), left)])
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # the receiver acknowledges having read everything
    took = time.perf_counter() - t0
    sock.close()
    return took


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m emulator.net.probe")
    ap.add_argument("mode", choices=["recv", "send"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--tos", type=int, default=0)
    ap.add_argument("--bytes", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--start-at", type=float, default=0.0)
    args = ap.parse_args(argv)
    if args.mode == "recv":
        _recv(args.port)
    else:
        took = _send(args.host, args.port, args.tos, args.bytes, args.latency, args.start_at)
        print(json.dumps({"seconds": took}))


if __name__ == "__main__":
    main()
