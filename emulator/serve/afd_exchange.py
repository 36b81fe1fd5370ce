"""The AFD activation exchange as real bytes: an FFN instance's service and an attention engine's client.

An attention engine's modelled step already contains the exchange (``emulator.costmodel.afd``);
these are the bytes behind it. Every step the attention worker sends each of its FFN instances
that instance's share of the step's activations (all MoE layers, all micro-batches, one way),
byte-scaled by the tier's S as KV transfers are, and the FFN instance answers with the same
amount: the results coming back. Both directions go through each side's own shaped link for the
tier between them (``PacedLink`` in the sender, or the namespace's tc tree), so the link carries
the traffic AFD puts on it, and a degraded or cut link (``infemu link set``, faults) slows or
stops the steps that depend on it: a step ends at its modelled time or when its exchange is
back, whichever is later.

The FFN service is internal: it answers only requests carrying the cluster token, reads at most
``MAX_EXCHANGE_WIRE_BYTES`` per request and sends back exactly what it read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time

from aiohttp import ClientSession, ClientTimeout, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from emulator.net.inproc import PacedLink
from emulator.net.plan import link_plan
from emulator.net.tc import KernelLink
from emulator.serve.internal import cluster_token, internal_headers, is_internal
from emulator.serve.paced import paced_post, send_paced
from emulator.topology import Instance, Topology

log = logging.getLogger("infemu.afd")
EXCHANGE_PATH = "/internal/afd/exchange"
MAX_EXCHANGE_WIRE_BYTES = 64 * 1024 * 1024  # one step's share on the wire; S keeps real steps far below


def make_links(spec, topo: Topology, inst: Instance, shaping: str) -> tuple[dict, dict[str, float]]:
    """This instance's egress link per tier and the tiers' byte scales (as every worker shapes)."""
    links: dict[str, PacedLink | KernelLink] = {}
    scales: dict[str, float] = {}
    for name, plan in link_plan(spec, topo, inst).items():
        scales[name] = plan.scale
        if shaping == "tc":
            links[name] = KernelLink(name, plan.tier.kind, plan.wire_rate, plan.latency_s)
        else:
            links[name] = PacedLink(name, plan.wire_rate, plan.latency_s)
    return links, scales


class FfnService:
    """One FFN instance: no scheduler, no API; it takes activations in and sends results back."""

    def __init__(self, cluster, inst: Instance, topo: Topology, shaping: str = "inproc") -> None:
        self.cluster = cluster
        self.inst = inst
        self.name = inst.name
        self.token = cluster_token()
        self.links, self.scales = make_links(cluster.spec, topo, inst, shaping)
        self.registry = CollectorRegistry()
        labels = ["model_name", "instance"]
        lv = (cluster.spec.model.name, inst.name)
        self.bytes = Counter(
            "infemu_link_bytes",
            "Logical bytes sent per link tier and direction.",
            [*labels, "tier", "direction"],
            registry=self.registry,
        )
        self._lv = lv
        self.exchanges = Counter(
            "infemu_afd_exchanges", "Activation exchanges this FFN instance answered.", labels, registry=self.registry
        ).labels(*lv)

    async def exchange(self, request: web.Request) -> web.StreamResponse:
        if not is_internal(request.headers, self.token):
            raise web.HTTPForbidden(
                text=json.dumps({"error": "the expert side answers this cluster's attention workers only"}),
                content_type="application/json",
            )
        tier = request.headers.get("X-Infemu-Tier", "")
        link = self.links.get(tier)
        if link is None:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": f"X-Infemu-Tier: unknown tier {tier!r}; one of {', '.join(self.links)}"}),
                content_type="application/json",
            )
        try:
            logical = float(request.headers.get("X-Infemu-Logical-Bytes", "0"))
        except ValueError:
            logical = -1.0
        if not math.isfinite(logical) or logical < 0:
            raise web.HTTPBadRequest(
                text=json.dumps({"error": "X-Infemu-Logical-Bytes: a non-negative number"}),
                content_type="application/json",
            )
        wire = 0
        async for chunk in request.content.iter_chunked(1 << 16):
            wire += len(chunk)
            if wire > MAX_EXCHANGE_WIRE_BYTES:
                raise web.HTTPRequestEntityTooLarge(MAX_EXCHANGE_WIRE_BYTES, wire)
        self.bytes.labels(*self._lv, tier, "afd_rx").inc(logical)
        resp = web.StreamResponse(
            headers={"Content-Length": str(wire), "Content-Type": "application/octet-stream", "X-Infemu-Tier": tier}
        )
        await send_paced(request, resp, link, wire)
        self.bytes.labels(*self._lv, tier, "afd_return").inc(logical)
        self.exchanges.inc()
        return resp

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "instance": self.name, "role": "ffn"})

    async def metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_ffn_app(cluster, inst: Instance, topo: Topology, shaping: str = "inproc") -> web.Application:
    service = FfnService(cluster, inst, topo, shaping)
    app = web.Application(client_max_size=MAX_EXCHANGE_WIRE_BYTES)
    app.router.add_post(EXCHANGE_PATH, service.exchange)
    app.router.add_get("/health", service.health)
    app.router.add_get("/ready", service.health)
    app.router.add_get("/metrics", service.metrics)
    return app


class AfdExchanger:
    """An attention worker's side: per step, its FFN partners' shares out and back, concurrently."""

    def __init__(self, partners: list[tuple[Instance, str]], topo: Topology, me: Instance, links: dict, scales: dict):
        self.partners = partners  # (FFN instance, its URL)
        self.topo, self.me = topo, me
        self.links, self.scales = links, scales
        self.token = cluster_token()
        self.session: ClientSession | None = None
        self.failures = 0
        self._warned = 0.0

    async def start(self) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=60, sock_connect=5))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def _one(self, inst: Instance, url: str, logical: float) -> None:
        tier = self.topo.tier_between(self.me, inst)
        link = self.links[tier.name]
        wire = max(1, math.ceil(logical / self.scales[tier.name]))
        headers = {
            **internal_headers(self.token),
            "X-Infemu-Tier": tier.name,
            "X-Infemu-Logical-Bytes": str(logical),
            "Content-Type": "application/octet-stream",
        }
        assert self.session is not None
        async with paced_post(self.session, f"{url}{EXCHANGE_PATH}", link, wire, headers) as resp:
            if resp.status != 200:
                raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:200]}")
            async for _ in resp.content.iter_chunked(1 << 16):
                pass

    async def run(self, logical_each_way: float, metrics=None) -> None:
        """One step's exchange: each partner gets its share; failures are counted and logged, and the
        step then ends at its modelled time (the experts' results are not what the emulation returns)."""
        if not self.partners or logical_each_way <= 0:
            return
        share = logical_each_way / len(self.partners)
        results = await asyncio.gather(
            *(self._one(inst, url, share) for inst, url in self.partners), return_exceptions=True
        )
        for (inst, _), res in zip(self.partners, results, strict=True):
            if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                self.failures += 1
                if metrics is not None:
                    metrics.afd_exchange_failures.inc()
                now = time.monotonic()
                if now - self._warned > 10:
                    self._warned = now
                    log.warning("AFD exchange with %s failed: %s", inst.name, res)
