"""The ``tc`` shaping backend: every instance in its own network namespace, shaped by the kernel.

Per run: a bridge with a private /24 on this machine only; per instance a network
namespace joined to the bridge by a veth. Inside each namespace the egress tree
is static — an HTB root with one class per link tier and a TBF leaf under each
class (HTB alone does not split GSO super-packets and under-shapes), classified
by the IP TOS byte the sender sets for the destination's tier — so the tree never
needs peer addresses. Unclassified traffic (HTTP control) is not shaped.

Rates are wire rates: the payload rate × 1514/1448 (Ethernet + IP + TCP headers
per full segment). This kernel has no netem: latency is added by the sender.
Everything is named after the run id, so ``cleanup(run_id)`` removes exactly what
one run made, also after a crash.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass

WIRE_PER_PAYLOAD = 1514 / 1448
TIER_TOS = {"scale-up": 0x20, "scale-out": 0x40, "pcie": 0x60}
UNSHAPED_RATE = "20gbit"
MIN_BURST_BYTES = 64 * 1024


class TcError(RuntimeError):
    pass


@dataclass(frozen=True)
class TierClass:
    """One shaped class: the tier kind (selects the TOS), its payload rate, its class id."""

    kind: str
    payload_bytes_per_s: float
    classid: int

    @property
    def tos(self) -> int:
        return TIER_TOS[self.kind]

    @property
    def wire_bits_per_s(self) -> int:
        return int(self.payload_bytes_per_s * 8 * WIRE_PER_PAYLOAD)

    @property
    def burst_bytes(self) -> int:
        # >= 64 KB (a GSO super-packet), and about 4 ms of traffic at high rates
        return max(MIN_BURST_BYTES, int(self.payload_bytes_per_s * WIRE_PER_PAYLOAD * 0.004))


def _class_and_leaf(verb: str, dev: str, c: TierClass) -> list[list[str]]:
    """The HTB class and its TBF leaf for one tier (``verb``: replace to build, change to retune)."""
    rate, burst = f"{c.wire_bits_per_s}bit", str(c.burst_bytes)
    return [
        ["tc", "class", verb, "dev", dev, "parent", "1:", "classid", f"1:{c.classid}", "htb",
         "rate", rate, "ceil", rate, "burst", burst, "cburst", burst],
        ["tc", "qdisc", verb, "dev", dev, "parent", f"1:{c.classid}", "handle", f"{c.classid}:", "tbf",
         "rate", rate, "burst", burst, "latency", "100ms"],
    ]  # fmt: skip


def tree_commands(dev: str, classes: list[TierClass]) -> list[list[str]]:
    """The static egress tree of one namespace, as tc argument lists (pure: unit-testable)."""
    cmds = [
        ["tc", "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb", "default", "99", "r2q", "1000"],
        ["tc", "class", "replace", "dev", dev, "parent", "1:", "classid", "1:99", "htb", "rate", UNSHAPED_RATE],
    ]
    for c in classes:
        cmds += _class_and_leaf("replace", dev, c)
        cmds.append(
            ["tc", "filter", "replace", "dev", dev, "parent", "1:", "protocol", "ip", "prio", "1",
             "handle", f"800::{c.classid}", "u32", "match", "ip", "tos", hex(c.tos), "0xfc", "flowid", f"1:{c.classid}"]
        )  # fmt: skip
    return cmds


class KernelLink:
    """The tc backend's sender side: mark the socket's TOS for the tier, add the latency, write at
    full speed; the namespace's HTB/TBF class does the shaping (shared by every flow on the tier)."""

    def __init__(self, name: str, kind: str, rate_bytes_per_s: float, latency_s: float) -> None:
        self.name = name
        self.tos = TIER_TOS[kind]
        self.rate = rate_bytes_per_s  # what the kernel class is set to (reported, and base for live changes)
        self.latency_s = latency_s

    def set(self, rate_bytes_per_s: float | None = None, latency_s: float | None = None) -> None:
        if rate_bytes_per_s is not None:
            self.rate = rate_bytes_per_s
        if latency_s is not None:
            self.latency_s = latency_s

    def mark(self, sock) -> None:
        import socket

        if sock is not None:
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, self.tos)

    async def send(self, nbytes: int, write) -> float:
        import asyncio

        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        chunk = bytes(256 * 1024)
        left = nbytes
        while left > 0:
            size = min(len(chunk), left)
            await write(chunk[:size])
            left -= size
        return loop.time() - t0


def _run(cmd: list[str], netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    full = ["ip", "netns", "exec", netns, *cmd] if netns else cmd
    r = subprocess.run(full, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise TcError(f"{' '.join(full)}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def available() -> tuple[bool, str]:
    """Whether this process can build the tc backend here, and why not."""
    if os.geteuid() != 0:
        return False, "not root (the tc backend needs CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"{tool} not found (install iproute2)"
    probe = "infemu-probe-ns"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "link", "set", "lo", "up"], netns=probe)
        for c in tree_commands("lo", [TierClass("scale-out", 1e6, 10)]):
            _run(c, netns=probe)
    except TcError as exc:
        return False, f"cannot build the HTB/TBF tree: {exc}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return True, "root, network namespaces, HTB, TBF and u32 TOS filters work"


def netem_available() -> bool:
    probe = "infemu-probe-netem"
    try:
        _run(["ip", "netns", "add", probe])
        r = _run(["tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"], netns=probe, check=False)
        return r.returncode == 0
    except TcError:
        return False
    finally:
        _run(["ip", "netns", "del", probe], check=False)


def ifb_available() -> bool:
    r = _run(["ip", "link", "add", "infemu-ifbprb", "type", "ifb"], check=False)
    if r.returncode == 0:
        _run(["ip", "link", "del", "infemu-ifbprb"], check=False)
        return True
    return False


@dataclass
class NamespaceHost:
    name: str  # instance name
    netns: str
    address: str
    veth: str


class TcNetwork:
    """The namespaces and bridge of one run. Names: bridge ``ibr<id>``, veths ``iv<id><n>``,
    namespaces ``infemu-<id>-<n>``; the /24 is 10.213.<k>.0 with k unused on this host."""

    def __init__(self, run_id: str) -> None:
        if len(run_id) != 6:
            raise ValueError("run ids are 6 characters (interface names are limited to 15)")
        self.run_id = run_id
        self.bridge = f"ibr{run_id}"
        self.hosts: dict[str, NamespaceHost] = {}
        self.subnet = self._free_subnet()

    @staticmethod
    def _free_subnet() -> int:
        used = _run(["ip", "-4", "-o", "addr", "show"], check=False).stdout
        for k in range(1, 255):
            if f"10.213.{k}." not in used:
                return k
        raise TcError("no free 10.213.k.0/24 subnet on this host")

    def create(self, instances: list[str]) -> dict[str, NamespaceHost]:
        try:
            _run(["ip", "link", "add", self.bridge, "type", "bridge"])
            _run(["ip", "addr", "add", f"10.213.{self.subnet}.1/24", "dev", self.bridge])
            _run(["ip", "link", "set", self.bridge, "up"])
            for n, name in enumerate(instances):
                host = NamespaceHost(
                    name, f"infemu-{self.run_id}-{n}", f"10.213.{self.subnet}.{n + 2}", f"iv{self.run_id}{n}"
                )
                _run(["ip", "netns", "add", host.netns])
                _run(["ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", host.netns])
                _run(["ip", "link", "set", host.veth, "master", self.bridge, "up"])
                _run(["ip", "addr", "add", f"{host.address}/24", "dev", "eth0"], netns=host.netns)
                _run(["ip", "link", "set", "eth0", "up"], netns=host.netns)
                _run(["ip", "link", "set", "lo", "up"], netns=host.netns)
                self.hosts[name] = host
        except TcError:
            cleanup(self.run_id)
            raise
        return self.hosts

    def shape(self, instance: str, classes: list[TierClass]) -> None:
        host = self.hosts[instance]
        for cmd in tree_commands("eth0", classes):
            _run(cmd, netns=host.netns)


def run_objects(run_id: str) -> tuple[list[str], list[str]]:
    """Namespaces and links on this host that belong to a run."""
    ns = [
        line.split()[0]
        for line in _run(["ip", "netns", "list"], check=False).stdout.splitlines()
        if line.startswith(f"infemu-{run_id}-")
    ]
    links = []
    for line in _run(["ip", "-o", "link", "show"], check=False).stdout.splitlines():
        parts = line.split(": ")
        if len(parts) > 1:
            name = parts[1].split("@")[0]
            if name in (f"ibr{run_id}",) or name.startswith(f"iv{run_id}"):
                links.append(name)
    return ns, links


def cleanup(run_id: str) -> list[str]:
    """Remove every namespace, veth and bridge of a run (idempotent). Returns what was removed."""
    ns, links = run_objects(run_id)
    for n in ns:
        pids = _run(["ip", "netns", "pids", n], check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        _run(["ip", "netns", "del", n], check=False)
    for link in links:
        _run(["ip", "link", "del", link], check=False)
    return ns + links
