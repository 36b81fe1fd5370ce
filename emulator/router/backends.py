"""The router's view of its backends: health, and load polled from them.

Each backend is polled every ``scrape_interval_s`` (100 ms: least-loaded sees
load at most that stale) for running/waiting requests and KV usage — from
infemu's cheap ``/load`` JSON, or from vLLM's gauges in ``/metrics`` for any
other vLLM-compatible backend (rendering every histogram at 10 Hz would itself
disturb an emulated worker's step timing); a
failed scrape ejects the backend, the next good one readmits it. Requests the
router has in flight to a backend count too, so a burst between two scrapes
does not all land on one backend.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiohttp import ClientError, ClientSession, ClientTimeout

from emulator.router.policies import EndpointSnapshot

log = logging.getLogger("infemu.router")


@dataclass
class Backend:
    name: str
    role: str
    url: str
    healthy: bool = False
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    num_gpu_blocks: int = 0
    in_flight: int = 0
    failures: int = 0
    load_endpoint: bool = True  # infemu workers answer /load; other vLLM look-alikes only /metrics
    last_ok: float = field(default=0.0)

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


class BackendPool:
    def __init__(self, backends: list[Backend], scrape_interval_s: float = 0.1) -> None:
        self.backends = backends
        self.scrape_interval_s = scrape_interval_s
        self._task: asyncio.Task | None = None
        self._session: ClientSession | None = None

    def by_role(self, *roles: str) -> list[Backend]:
        return [b for b in self.backends if b.role in roles]

    async def start(self) -> None:
        self._session = ClientSession(timeout=ClientTimeout(total=2.0))
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
            await asyncio.sleep(self.scrape_interval_s)
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
        except (ClientError, asyncio.TimeoutError, OSError) as exc:
            b.failures += 1
            if b.healthy:
                log.warning("backend %s ejected: %s", b.name, exc)
            b.healthy = False
            return
        if not b.healthy:
            log.info("backend %s admitted", b.name)
        b.healthy = True
        b.failures = 0
        b.running = int(load.get("running", 0))
        b.waiting = int(load.get("waiting", 0))
        b.kv_usage = load.get("kv_usage", 0.0)
        b.num_gpu_blocks = int(load.get("num_gpu_blocks", b.num_gpu_blocks))
        b.last_ok = asyncio.get_running_loop().time()

    def mark_failed(self, b: Backend) -> None:
        """A request could not reach it: eject now rather than at the next scrape."""
        b.healthy = False
        b.failures += 1
