"""An engine worker's side of the KV store: look a prompt's next blocks up, fetch them when that beats
recomputing, write finished prefills (or evicted blocks) back.

The same choices as the simulator (``sim/stages.py``): the prompt's store is chosen by its first
block's hash (a prefix lives on one shard), the fetch-or-recompute decision is ``kvstore/decide.py``
with the store tier's rate and latency, and fetched blocks become cached blocks of this engine
(``BlockPool.install``) so the scheduler's prefix lookup finds them. A store that fails or answers
late only costs the fetch: the prompt is then computed, as without a store.
"""

from __future__ import annotations

import asyncio
import logging
import math

from aiohttp import ClientError, ClientSession, ClientTimeout

from emulator.engine.request import Request
from emulator.kvstore.decide import plan_prompt_fetch
from emulator.serve.internal import internal_headers
from emulator.serve.paced import paced_post
from emulator.topology import Instance, Topology

log = logging.getLogger("infemu.kvstore")


class KVStoreClient:
    def __init__(self, store: tuple[Instance, str], topo: Topology, me: Instance, links, scales, token,
                 cost, block_size: int, write_policy: str, metrics, dilation: float) -> None:  # fmt: skip
        """``store``: the one store instance (the kvstore role's checks) and its URL."""
        self.url = store[1]
        self.tier = topo.tier_between(me, store[0])
        self.topo, self.me = topo, me
        self.links, self.scales = links, scales
        self.token = token
        self.cost = cost
        self.block_size = block_size
        self.write_policy = write_policy
        self.metrics = metrics
        self.dilation = dilation
        self.session: ClientSession | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=120, sock_connect=5))

    async def close(self) -> None:
        for t in list(self.tasks):
            t.cancel()
        if self.session is not None:
            await self.session.close()

    async def _post_json(self, url: str, body: dict) -> dict:
        assert self.session is not None
        async with self.session.post(url, json=body, headers=internal_headers(self.token)) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:200]}")
            return await resp.json()

    async def lookup(self, scheduler, req: Request) -> tuple[int, int, float]:
        """(local blocks, store blocks after them, block bytes) for a prompt, now."""
        local = scheduler.kv.cached_prefix_blocks(req.block_hashes, req.num_prompt_tokens)
        url = self.url
        got = await self._post_json(
            f"{url}/internal/kvstore/lookup", {"hashes": list(req.block_hashes), "start": local}
        )
        found = int(got["blocks"])
        bs = self.block_size
        self.metrics.external_prefix_queries.inc(max(0, req.num_prompt_tokens - local * bs))
        self.metrics.external_prefix_hits.inc(found * bs)
        return local, found, float(got["block_bytes"])

    async def fetch(self, scheduler, req: Request, local: int, found: int, block_bytes: float) -> int:
        """Fetch the blocks if that is cheaper than computing them; returns the tokens fetched."""
        url, tier = self.url, self.tier
        bs = self.block_size
        plan = plan_prompt_fetch(
            self.cost,
            local_blocks=local,
            store_blocks=found,
            prompt_tokens=req.num_prompt_tokens,
            block_size=bs,
            block_bytes=block_bytes,
            tier=tier,
            endpoints=min(self.topo.gpus_per_node, self.me.num_gpus or self.topo.gpus_per_node),
        )
        if not plan.fetch:
            return 0
        hashes = list(req.block_hashes[local : local + plan.blocks])
        assert self.session is not None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with self.session.post(
            f"{url}/internal/kvstore/fetch",
            json={"hashes": hashes, "to": self.me.name},
            headers=internal_headers(self.token),
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:200]}")
            n = int(resp.headers.get("X-Infemu-Blocks", "0"))
            logical = float(resp.headers.get("X-Infemu-Logical-Bytes", "0"))
            async for _ in resp.content.iter_chunked(1 << 16):
                pass
        scheduler.kv.pool.install(hashes[:n])
        self.metrics.store_fetched_tokens.inc(n * bs)
        self.metrics.store_fetched_total += n * bs
        self.metrics.store_fetch_seconds.observe((loop.time() - t0) / self.dilation)
        self.metrics.link(tier.name, "kvstore_rx", logical)
        return n * bs

    def write_back(self, hashes) -> None:
        """Send the blocks the store lacks, in the background (a failure costs only the reuse)."""
        if not hashes:
            return
        task = asyncio.ensure_future(self._write(list(hashes)))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _write(self, hashes: list[int]) -> None:
        url, tier = self.url, self.tier
        try:
            got = await self._post_json(f"{url}/internal/kvstore/reserve", {"hashes": hashes})
            if not got.get("ticket"):
                return
            logical = len(got["missing"]) * float(got["block_bytes"])
            wire = max(1, math.ceil(logical / self.scales[tier.name]))
            headers = {
                **internal_headers(self.token),
                "X-Infemu-Tier": tier.name,
                "Content-Type": "application/octet-stream",
            }
            assert self.session is not None
            async with paced_post(
                self.session, f"{url}/internal/kvstore/write/{got['ticket']}", self.links[tier.name], wire, headers
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:200]}")
            self.metrics.store_written_blocks.inc(len(got["missing"]))
            self.metrics.link(tier.name, "kvstore_tx", logical)
        except (OSError, ClientError, RuntimeError, ValueError, KeyError, asyncio.TimeoutError) as exc:
            self.metrics.store_failures.inc()
            log.warning("KV-store write to %s failed: %s", url, exc)

    def prefill_done(self, req: Request) -> None:
        """Write-through: a finished prefill's full prompt blocks."""
        if self.write_policy == "write-through":
            full = min(len(req.block_hashes), req.num_prompt_tokens // self.block_size)
            self.write_back(req.block_hashes[:full])

    def drain_evictions(self, pool) -> None:
        """On-evict: the blocks this engine's cache evicted since the last call."""
        if pool.evicted:
            evicted, pool.evicted = pool.evicted, []
            self.write_back(evicted)
