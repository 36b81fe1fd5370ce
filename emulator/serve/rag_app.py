"""The ``rag`` worker: a retrieval service over the synthetic corpus, timed by the retrieval cost model.

``POST /v1/retrieve`` takes a query (text, and optionally its length in tokens when the text stands
for a longer one), ``top_k``, an optional id filter (a vector store's ``has_id``: a replay names the
documents) and ``include_text``; it answers the documents' ids, token lengths and scores (and their
synthetic text, whose length in tokens is exact for infemu's tokenizer, so a client can quote them in
a prompt of the right size). Concurrent queries are batched: a batch takes up to ``maxBatch`` waiting
queries and lasts the cost model's time for it (x the time dilation). Everything a client sends is
bounded (query length, top_k, filter size, text returned); a full queue answers 503 at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from emulator.rag.corpus import Document, document_text
from emulator.rag.retriever import RetrieverModel
from emulator.serve.protocol import APIError, read_json_object
from emulator.serve.tokens import tokenize
from emulator.topology import Instance, Topology

MAX_QUERY_CHARS = 65_536
MAX_TOP_K = 64
MAX_QUERY_TOKENS = 131_072
MAX_TEXT_TOKENS = 262_144  # documents' text returned by one request, in tokens
MAX_BODY_BYTES = 1 << 20
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)
_TIME_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class _Query:
    query: str
    tokens: int
    top_k: int
    among: tuple[int, ...] | None
    include_text: bool
    queued: float
    done: asyncio.Future = field(repr=False, default=None)


def parse_retrieve(body: dict) -> tuple[str, int | None, int, tuple[int, ...] | None, bool]:
    """The request's fields, each checked; an ``APIError(400)`` names the field and the fix."""
    query = body.get("query")
    if not isinstance(query, str) or not query:
        raise APIError(400, "query: a non-empty string is required", "query")
    if len(query) > MAX_QUERY_CHARS:
        raise APIError(400, f"query: at most {MAX_QUERY_CHARS} characters", "query")
    tokens = body.get("query_tokens")
    if tokens is not None and (
        not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_QUERY_TOKENS
    ):
        raise APIError(400, f"query_tokens: an integer from 1 to {MAX_QUERY_TOKENS}", "query_tokens")
    top_k = body.get("top_k", 4)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise APIError(400, f"top_k: an integer from 1 to {MAX_TOP_K}", "top_k")
    among = None
    flt = body.get("filter")
    if flt is not None:
        ids = flt.get("ids") if isinstance(flt, dict) else None
        if (
            not isinstance(ids, list)
            or not 1 <= len(ids) <= MAX_TOP_K
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 2**63 for i in ids)
        ):
            raise APIError(400, f"filter.ids: a list of 1 to {MAX_TOP_K} non-negative document ids", "filter")
        among = tuple(ids)
    include_text = body.get("include_text", False)
    if not isinstance(include_text, bool):
        raise APIError(400, "include_text: true or false", "include_text")
    return query, tokens, top_k, among, include_text


class Retriever:
    def __init__(self, cluster, inst: Instance, topo: Topology) -> None:
        pool = next(p for p in cluster.spec.pools if p.name == inst.pool)
        self.name = inst.name
        self.spec = pool.rag
        self.model = RetrieverModel(pool.rag, topo.gpu)
        self.dilation = cluster.spec.emulation.time_dilation
        self.queue: deque[_Query] = deque()
        self.wake = asyncio.Event()
        self.task: asyncio.Task | None = None
        r = self.registry = CollectorRegistry()
        self.queries = Counter("infemu_retrieval_queries", "Retrieval queries answered.", registry=r)
        self.rejected = Counter("infemu_retrieval_rejected", "Queries refused: the queue was full.", registry=r)
        self.batch_size = Histogram(
            "infemu_retrieval_batch_size", "Queries per retrieval batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.phase = Histogram(
            "infemu_retrieval_phase_seconds",
            "Emulated seconds per query and phase: queue, embed, search, rerank (a batch's phases count for each"
            " of its queries).",
            ["phase"],
            buckets=_TIME_BUCKETS,
            registry=r,
        )
        self.waiting = Gauge("infemu_retrieval_waiting", "Queries waiting for a batch.", registry=r)

    async def start(self) -> None:
        self.task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        for q in self.queue:
            if not q.done.done():
                q.done.set_exception(APIError(503, "the retriever is shutting down", None, "shutting_down"))

    async def retrieve(self, request: web.Request) -> web.Response:
        try:
            query, tokens, top_k, among, include_text = parse_retrieve(await read_json_object(request))
        except APIError as exc:
            return web.json_response(exc.body(), status=exc.status)
        if include_text and among is None and top_k * self._max_doc_tokens() > MAX_TEXT_TOKENS:
            exc = APIError(
                400, f"include_text: at most {MAX_TEXT_TOKENS} tokens of text per request; lower top_k", "include_text"
            )
            return web.json_response(exc.body(), status=400)
        if len(self.queue) >= self.spec.max_waiting:
            self.rejected.inc()
            exc = APIError(503, f"{self.name}: retrieval queue full (rag.maxWaiting)", None, "overloaded")
            return web.json_response(exc.body(), status=503, headers={"Retry-After": "1"})
        q = _Query(query, tokens or max(len(tokenize(query, 1 << 30)), 1), top_k, among, include_text, time.monotonic())
        q.done = asyncio.get_running_loop().create_future()
        self.queue.append(q)
        self.waiting.set(len(self.queue))
        self.wake.set()
        try:
            return web.json_response(await q.done)
        except APIError as exc:
            return web.json_response(exc.body(), status=exc.status)

    def _max_doc_tokens(self) -> int:
        law = self.spec.corpus.doc_tokens
        return getattr(law, "max", None) or getattr(law, "value", 0)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.wake.wait()
            self.wake.clear()
            while self.queue:
                batch = [self.queue.popleft() for _ in range(min(self.spec.max_batch, len(self.queue)))]
                self.waiting.set(len(self.queue))
                started = time.monotonic()
                found, t = self.model.batch([(q.query, q.tokens, q.top_k, q.among) for q in batch])
                deadline = loop.time() + t.total_s * self.dilation
                await asyncio.sleep(max(deadline - loop.time(), 0.0))
                self.batch_size.observe(len(batch))
                for q, docs in zip(batch, found, strict=False):
                    queue_s = (started - q.queued) / self.dilation
                    for phase, v in (
                        ("queue", queue_s),
                        ("embed", t.embed_s),
                        ("search", t.search_s),
                        ("rerank", t.rerank_s),
                    ):
                        self.phase.labels(phase).observe(v)
                    self.queries.inc()
                    if not q.done.done():
                        q.done.set_result(self._answer(q, docs, queue_s, t, len(batch)))

    def _answer(self, q: _Query, docs: list[Document], queue_s: float, t, batch: int) -> dict:
        data = []
        for d in docs:
            item = {"id": d.id, "tokens": d.tokens, "score": d.score}
            if q.include_text:
                item["text"] = document_text(d)
            data.append(item)
        return {
            "object": "list",
            "data": data,
            "usage": {"query_tokens": q.tokens},
            "timing": {"queue_ms": queue_s * 1e3, **t.to_json(), "batch": batch},
            "retriever": self.name,
        }

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_rag_app(cluster, inst: Instance, topo: Topology, shaping: str = "inproc") -> web.Application:
    """``shaping`` is unused: a retriever's answers are small and go unshaped, as its requests."""
    service = Retriever(cluster, inst, topo)
    app = web.Application(client_max_size=MAX_BODY_BYTES)

    async def lifecycle(app: web.Application):
        await service.start()
        yield
        await service.stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/retrieve", service.retrieve)
    app.router.add_get("/health", service.health)
    app.router.add_get("/ready", service.health)
    app.router.add_get("/metrics", service.metrics)
    return app
