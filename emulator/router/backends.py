"""The router's view of its backends: health, load polled from them, and circuit breaking.

Each backend is polled every ``interval_s`` (100 ms: least-loaded sees load at most
that stale) for running/waiting requests and KV usage — from infemu's cheap ``/load``
JSON, or from vLLM's gauges in ``/metrics`` for any other vLLM-compatible backend
(rendering every histogram at 10 Hz would itself disturb an emulated worker's step
timing). That poll is the active health check: ``unhealthy_threshold`` failures in a
row (a refused connection, an error, no answer within ``timeout_s``: a hung process)
eject the backend, ``healthy_threshold`` good ones re-admit it. Requests are the
passive check (Envoy's outlier detection): ``consecutive_failures`` backend failures in
a row open its circuit for an ejection time that doubles with each ejection. Requests
the router has in flight to a backend count as load too, so a burst between two polls
does not all land on one backend.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from aiohttp import ClientError, ClientSession, ClientTimeout

from emulator.router.policies import EndpointSnapshot

log = logging.getLogger("infemu.router")


@dataclass
class Backend:
    name: str
    role: str
    url: str
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    num_gpu_blocks: int = 0
    in_flight: int = 0
    failures: int = 0
    load_endpoint: bool = True  # infemu workers answer /load; other vLLM look-alikes only /metrics
    last_ok: float = field(default=0.0)
    checked: bool = False  # the active health check's verdict
    check_failures: int = 0  # failed checks in a row
    check_successes: int = 0
    request_failures: int = 0  # backend failures of requests in a row (passive check)
    ejections: int = 0  # circuit openings in a row: each doubles the ejection time
    ejected_until: float = 0.0  # monotonic seconds; the circuit is open until then
    unreachable: bool = False  # an injected partition between the router and this backend

    @property
    def healthy(self) -> bool:
        return self.checked and not self.unreachable and time.monotonic() >= self.ejected_until

    @property
    def queued(self) -> int:
        """Requests waiting at the backend: scraped, or what the router's own in-flight count implies."""
        return max(self.waiting, self.in_flight - self.running)

    def snapshot(self) -> EndpointSnapshot:
        free = int(self.num_gpu_blocks * (1.0 - self.kv_usage))
        running = max(self.running, self.in_flight - self.waiting)  # scraped, or fresher local knowledge
        return EndpointSnapshot(self.name, running, self.waiting, self.kv_usage, free, self.healthy)


def parse_load(text: str) -> dict[str, float]:
    """The few gauges a router needs, read without a full exposition parser (cheap at 10 Hz)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("vllm:num_requests_running{"):
            out["running"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:num_requests_waiting{"):
            out["waiting"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:kv_cache_usage_perc{"):
            out["kv_usage"] = float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:cache_config_info{") and 'num_gpu_blocks="' in line:
            out["num_gpu_blocks"] = float(line.split('num_gpu_blocks="', 1)[1].split('"', 1)[0])
    return out


@dataclass(frozen=True)
class HealthPolicy:
    """Active and passive health checking, in wall seconds (the router scales the spec's by its dilation)."""

    interval_s: float = 0.1
    timeout_s: float = 0.5
    unhealthy_threshold: int = 2
    healthy_threshold: int = 1
    consecutive_failures: int = 3
    ejection_s: float = 1.0
    max_ejection_s: float = 30.0


class BackendPool:
    def __init__(self, backends: list[Backend], policy: HealthPolicy = HealthPolicy()) -> None:
        self.backends = backends
        self.policy = policy
        self._task: asyncio.Task | None = None
        self._session: ClientSession | None = None
        self.on_eject = lambda backend, reason: None  # the router counts ejections

    def by_role(self, *roles: str) -> list[Backend]:
        return [b for b in self.backends if b.role in roles]

    async def start(self) -> None:
        self._session = ClientSession(timeout=ClientTimeout(total=self.policy.timeout_s))
        await self.scrape_all()
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval_s)
            await self.scrape_all()

    async def scrape_all(self) -> None:
        await asyncio.gather(*(self._scrape(b) for b in self.backends))

    async def _scrape(self, b: Backend) -> None:
        assert self._session is not None
        try:
            if b.load_endpoint:
                async with self._session.get(f"{b.url}/load") as resp:
                    if resp.status == 404:
                        b.load_endpoint = False
                    elif resp.status != 200:
                        raise ClientError(f"status {resp.status}")
                    else:
                        load = await resp.json()
            if not b.load_endpoint:
                async with self._session.get(f"{b.url}/metrics") as resp:
                    if resp.status != 200:
                        raise ClientError(f"status {resp.status}")
                    load = parse_load(await resp.text())
        except (ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            self._check_failed(b, str(exc) or type(exc).__name__)
            return
        if b.unreachable:
            self._check_failed(b, "partitioned from the router")
            return
        b.check_failures = 0
        b.check_successes += 1
        if not b.checked and b.check_successes >= self.policy.healthy_threshold:
            log.info("backend %s admitted", b.name)
            b.checked = True
        b.failures = 0
        b.running = int(load.get("running", 0))
        b.waiting = int(load.get("waiting", 0))
        b.kv_usage = load.get("kv_usage", 0.0)
        b.num_gpu_blocks = int(load.get("num_gpu_blocks", b.num_gpu_blocks))
        b.last_ok = asyncio.get_running_loop().time()

    def _check_failed(self, b: Backend, why: str) -> None:
        b.failures += 1
        b.check_successes = 0
        b.check_failures += 1
        if b.checked and b.check_failures >= self.policy.unhealthy_threshold:
            log.warning("backend %s ejected by the health check: %s", b.name, why)
            b.checked = False
            self.on_eject(b, "health_check")

    def mark_failed(self, b: Backend, refused: bool = False) -> None:
        """A request failed at this backend (passive check). A refused connection means the process
        is gone: the backend is ejected at once rather than at the next health check."""
        b.failures += 1
        b.request_failures += 1
        if refused and b.checked:
            log.warning("backend %s ejected: connection refused", b.name)
            b.checked = False
            b.check_successes = 0
            self.on_eject(b, "refused")
        if b.request_failures >= self.policy.consecutive_failures and time.monotonic() >= b.ejected_until:
            b.ejections += 1
            span = min(self.policy.ejection_s * 2 ** (b.ejections - 1), self.policy.max_ejection_s)
            b.ejected_until = time.monotonic() + span
            b.request_failures = 0
            log.warning("backend %s: circuit open for %.1f s after repeated failures", b.name, span)
            self.on_eject(b, "circuit_breaker")

    def mark_ok(self, b: Backend) -> None:
        """A request succeeded: the passive check's failure run ends (and, later, the ejection count)."""
        b.request_failures = 0
        if time.monotonic() > b.ejected_until + self.policy.max_ejection_s:
            b.ejections = 0
