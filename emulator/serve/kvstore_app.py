"""The ``kvstore`` worker: a remote KV-cache tier that engines look up, fetch from and write to.

Internal endpoints only (the cluster token, as ``/internal/kv``): a client can neither read nor
fill the store. Blocks are named by the chained prefix hashes the engines already compute; bytes
move for real, byte-scaled by the tier's S as every shaped transfer: a fetch streams the held
blocks' bytes through the store's own link (the store is the sender), a write's bytes come through
the writing engine's link and are stored when the last byte has arrived.

  POST /internal/kvstore/lookup  {"hashes": [...], "start": i} -> {"blocks": n, "block_bytes": B}
  POST /internal/kvstore/fetch   {"hashes": [...], "to": instance} -> the leading held blocks' bytes
                                  (``X-Infemu-Blocks`` says how many: an eviction may have shortened it)
  POST /internal/kvstore/reserve {"hashes": [...]} -> {"missing": [...], "ticket": t}
  POST /internal/kvstore/write/{t}  the missing blocks' bytes; stored on arrival
"""

from __future__ import annotations

import json
import math
import secrets
import time
from collections import OrderedDict

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from emulator.build import build_instances
from emulator.kvstore.store import KVStore
from emulator.roles import is_front
from emulator.serve.afd_exchange import make_links
from emulator.serve.internal import cluster_token, is_internal
from emulator.serve.paced import send_paced
from emulator.topology import Instance, Topology

MAX_HASHES = 1 << 20  # a 16M-token prompt of 16-token blocks
MAX_BODY_BYTES = 32 << 20
MAX_TICKETS = 4096
TICKET_TTL_S = 120.0


def store_block_bytes(spec) -> tuple[float, int]:
    """Bytes of one KV block of the served model, and the block size (the serving pools share one)."""
    _, setups = build_instances(spec)
    front = next(s for s in setups if is_front(s.instance.role))
    bs = front.engine.block_size
    return float(front.cost.kv_transfer_bytes(bs)), bs


def _hashes(body: dict, key: str = "hashes") -> list[int]:
    hs = body.get(key)
    if (
        not isinstance(hs, list)
        or len(hs) > MAX_HASHES
        or not all(isinstance(h, int) and not isinstance(h, bool) and 0 <= h < 2**64 for h in hs)
    ):
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"{key}: a list of at most {MAX_HASHES} block hashes (integers < 2^64)"}),
            content_type="application/json",
        )
    return hs


class StoreService:
    def __init__(self, cluster, inst: Instance, topo: Topology, shaping: str = "inproc") -> None:
        pool = next(p for p in cluster.spec.pools if p.name == inst.pool)
        self.name = inst.name
        self.token = cluster_token()
        block_bytes, self.block_size = store_block_bytes(cluster.spec)
        self.store = KVStore(pool.kvstore.capacity_gb * 1e9, block_bytes)
        self.links, self.scales = make_links(cluster.spec, topo, inst, shaping)
        self.tier = topo.host_tier(inst)
        self.tickets: OrderedDict[str, tuple[list[int], float]] = OrderedDict()
        r = self.registry = CollectorRegistry()
        labels = ["model_name", "instance"]
        lv = (cluster.spec.model.name, inst.name)
        self.blocks = Gauge("infemu_kvstore_blocks", "KV blocks held.", labels, registry=r).labels(*lv)
        Gauge("infemu_kvstore_capacity_blocks", "KV blocks the store can hold.", labels, registry=r).labels(*lv).set(
            self.store.capacity_blocks
        )
        self.counters = {
            key: Counter(f"infemu_kvstore_{key}", help_, labels, registry=r).labels(*lv)
            for key, help_ in (
                ("lookup_blocks", "Blocks engines asked about (after their own cached prefix)."),
                ("hit_blocks", "Leading blocks the store held when asked."),
                ("fetched_blocks", "Blocks sent to engines."),
                ("written_blocks", "New blocks written by engines."),
                ("evicted_blocks", "Blocks evicted (least recently used) to stay within capacity."),
            )
        }
        self.link_bytes = Counter(
            "infemu_link_bytes",
            "Logical bytes per link tier and direction.",
            [*labels, "tier", "direction"],
            registry=r,
        )
        self._lv = lv
        self._seen = self.store.stats.to_json()

    def _guard(self, request: web.Request) -> None:
        if not is_internal(request.headers, self.token):
            raise web.HTTPForbidden(
                text=json.dumps({"error": "the KV store serves this cluster's engines only"}),
                content_type="application/json",
            )

    def _sync_metrics(self) -> None:
        now = self.store.stats.to_json()
        for key, stat in (
            ("lookup_blocks", "lookup_blocks"),
            ("hit_blocks", "hit_blocks"),
            ("fetched_blocks", "fetched_blocks"),
            ("written_blocks", "put_blocks"),
            ("evicted_blocks", "evicted_blocks"),
        ):
            self.counters[key].inc(now[stat] - self._seen[stat])
        self._seen = now
        self.blocks.set(len(self.store))

    async def _body(self, request: web.Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text=json.dumps({"error": "a JSON object"}), content_type="application/json")
        return body

    async def lookup(self, request: web.Request) -> web.Response:
        self._guard(request)
        body = await self._body(request)
        hashes = _hashes(body)
        start = body.get("start", 0)
        if not isinstance(start, int) or isinstance(start, bool) or not 0 <= start <= len(hashes):
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "start: 0 to len(hashes)"}), content_type="application/json"
            )
        n = self.store.lookup(hashes, start)
        self._sync_metrics()
        return web.json_response({"blocks": n, "block_bytes": self.store.block_bytes})

    async def fetch(self, request: web.Request) -> web.StreamResponse:
        self._guard(request)
        hashes = _hashes(await self._body(request))
        n = self.store.read(hashes)
        self._sync_metrics()
        logical = n * self.store.block_bytes
        link = self.links[self.tier.name]
        wire = math.ceil(logical / self.scales[self.tier.name]) if n else 0
        resp = web.StreamResponse(
            headers={
                "X-Infemu-Blocks": str(n),
                "X-Infemu-Logical-Bytes": str(logical),
                "X-Infemu-Tier": self.tier.name,
                "Content-Length": str(wire),
                "Content-Type": "application/octet-stream",
            }
        )
        await send_paced(request, resp, link, wire)
        self.link_bytes.labels(*self._lv, self.tier.name, "kvstore_tx").inc(logical)
        return resp

    async def reserve(self, request: web.Request) -> web.Response:
        self._guard(request)
        hashes = _hashes(await self._body(request))
        missing = self.store.missing(hashes)
        if not missing:
            self.store.put(hashes)  # refresh recency
            return web.json_response({"missing": [], "ticket": None, "block_bytes": self.store.block_bytes})
        now = time.monotonic()
        while self.tickets and (len(self.tickets) >= MAX_TICKETS or next(iter(self.tickets.values()))[1] < now):
            self.tickets.popitem(last=False)
        ticket = secrets.token_hex(8)
        self.tickets[ticket] = (hashes, now + TICKET_TTL_S)
        return web.json_response({"missing": missing, "ticket": ticket, "block_bytes": self.store.block_bytes})

    async def write(self, request: web.Request) -> web.Response:
        self._guard(request)
        entry = self.tickets.pop(request.match_info["ticket"], None)
        if entry is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": "unknown or expired ticket"}), content_type="application/json"
            )
        hashes, _ = entry
        tier = request.headers.get("X-Infemu-Tier", self.tier.name)
        logical = len(self.store.missing(hashes)) * self.store.block_bytes
        limit = math.ceil(logical) + (1 << 16)  # the writer's byte scale S >= 1: never more than the logical bytes
        wire = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            wire += len(chunk)
            if wire > limit:
                raise web.HTTPRequestEntityTooLarge(limit, wire)
        self.store.put(hashes)
        self._sync_metrics()
        self.link_bytes.labels(*self._lv, tier, "kvstore_rx").inc(logical)
        return web.json_response({"stored": len(hashes)})

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "instance": self.name, "role": "kvstore"})

    async def stats(self, request: web.Request) -> web.Response:
        self._guard(request)
        st = self.store.stats.to_json()
        return web.json_response({**st, "blocks": len(self.store), "capacity_blocks": self.store.capacity_blocks})

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_kvstore_app(cluster, inst: Instance, topo: Topology, shaping: str = "inproc") -> web.Application:
    service = StoreService(cluster, inst, topo, shaping)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.router.add_post("/internal/kvstore/lookup", service.lookup)
    app.router.add_post("/internal/kvstore/fetch", service.fetch)
    app.router.add_post("/internal/kvstore/reserve", service.reserve)
    app.router.add_post("/internal/kvstore/write/{ticket}", service.write)
    app.router.add_get("/internal/kvstore/stats", service.stats)
    app.router.add_get("/health", service.health)
    app.router.add_get("/ready", service.health)
    app.router.add_get("/metrics", service.metrics)
    return app
