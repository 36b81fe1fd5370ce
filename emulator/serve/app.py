"""The worker service: one emulated serving instance behind vLLM's OpenAI API and metrics.

``create_app(settings)`` builds the aiohttp application; a cleanup context
starts the engine and, on shutdown, ends every open stream with an explicit
error. Roles: ``aggregated`` serves whole requests; ``prefill`` computes the prompt
(its one sampled token stays with the router) and holds the KV cache until a decode
instance pulls it (``/internal/kv``); ``decode`` accepts ``kv_transfer_params`` from
the router, pulls the KV over TCP through the shaped link, recomputes the prompt's last
token and streams every output token, the first included (as vLLM's decode instances do).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from emulator.build import InstanceSetup, afd_partners, build_instances
from emulator.checkpoint import served_model
from emulator.engine.hashing import hashes_from_tokens
from emulator.engine.request import Request
from emulator.engine.scheduler import Scheduler
from emulator.net.inproc import PacedLink
from emulator.net.tc import KernelLink
from emulator.roles import get_role, holds_kv_for_peer, is_front, service_factory
from emulator.serve.afd_exchange import AfdExchanger, make_links
from emulator.serve.api_path import ApiServerPath
from emulator.serve.engine_loop import RealTimeEngine, StreamEvent
from emulator.serve.internal import cluster_token, internal_headers, is_internal
from emulator.serve.kvstore_client import KVStoreClient
from emulator.serve.metrics import EngineMetrics
from emulator.serve.paced import send_paced
from emulator.serve.protocol import (
    APIError,
    GenerationRequest,
    chat_tools,
    full_response,
    json_text,
    parse_request,
    read_json_object,
    stream_chunk,
    token_chunk_frame,
    usage_chunk,
    with_usage,
)
from emulator.serve.tokens import (
    chat_prompt,
    detokenize,
    output_token,
    output_token_json,
    prompt_seed,
    stop_hit,
    synthetic_eos,
    tokenize,
)
from emulator.spec import InferenceCluster
from emulator.topology import Instance, Topology, place
from emulator.version import package_version

log = logging.getLogger("infemu.worker")

ARRIVAL_HEADER = "X-Infemu-Arrival"  # when the request reached the cluster (monotonic seconds), internal only
PATH_OVERHEAD_HEADER = "X-Infemu-Path-Overhead"  # the emulation's own way back (s): serve/api_path.py
PROBE_HEADER = "X-Infemu-Probe"  # answer at once with one token: measures the emulation's own HTTP path
TIMING_HEADER = "X-Infemu-Timing"  # the router's pipelines: report where the request's time went
# `infemu run`'s client, through the router: report when the model released the first token, so the
# client can measure what the emulation's own way back to it costs (``emulator.serve.api_path``)
FIRST_DUE_HEADER = "X-Infemu-First-Token-Due"
FIRST_DUE_COMMENT = b": infemu-first-token-due "
REQUEST_ID_HEADER = "X-Request-Id"  # as vLLM: the caller names the completion (`cmpl-<id>`, `chatcmpl-<id>`)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# a streaming response's tokens skip its task while the socket holds less than this unsent (aiohttp's
# own drain threshold); past it the task writes and awaits the drain, so a slow reader costs bounded memory
WRITE_THROUGH_LIMIT = 0x10000
KV_HOLD_TIMEOUT_S = 60.0  # a prefill's KV is released if no decode pulls it by then (vLLM's NIXL abort timeout)


@dataclass(frozen=True)
class WorkerSettings:
    cluster: InferenceCluster
    instance: str
    host: str = "127.0.0.1"
    port: int = 8000
    shaping: str = "inproc"  # inproc: pace in this process; tc: the namespace's qdiscs shape, we mark TOS
    peers: tuple[tuple[str, str], ...] = ()  # (instance, URL) of other workers: an AFD engine's FFN instances

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def named_instance(settings: WorkerSettings, instances: list[Instance]) -> Instance | None:
    """The instance ``settings.instance`` names: an instance name (<pool>-<n>), or on Kubernetes a pod
    name (<cluster>-<pool>-<n>)."""
    pod_form = settings.instance.removeprefix(f"{settings.cluster.name}-")
    return next((i for i in instances if i.name == settings.instance), None) or next(
        (i for i in instances if i.name == pod_form), None
    )


class Worker:
    """Everything one instance owns; routes are thin methods over it."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.token = cluster_token()
        spec = settings.cluster.spec
        self.topology: Topology
        self.topology, setups = build_instances(spec)
        inst = named_instance(settings, [s.instance for s in setups])
        if inst is None:
            raise ValueError(f"instance {settings.instance!r} is not in cluster {settings.cluster.name!r}")
        self.setup: InstanceSetup = next(s for s in setups if s.instance is inst)
        self.name = self.setup.instance.name  # what peers and the topology know this instance by
        self.model = served_model(spec.model)
        self.model_name = spec.model.name
        self.role = self.setup.instance.role
        eng = self.setup.engine
        # vLLM's label set (CacheConfig.metrics_info() as a current vLLM prints it, with the
        # kv_cache_size_tokens of vllm-project/vllm#42206); "auto" is vLLM's name for the model's dtype
        kv_dtype = self.model.quant.kv_cache
        cache_info = {
            "block_size": str(eng.block_size),
            "num_gpu_blocks": str(eng.num_gpu_blocks),
            "kv_cache_size_tokens": str(eng.num_gpu_blocks * eng.block_size),
            "cache_dtype": kv_dtype if kv_dtype.startswith("fp8") else "auto",
            "enable_prefix_caching": str(eng.enable_prefix_caching),
            "gpu_memory_utilization": f"{self.setup.memory.usable / self.topology.gpu.hbm_bytes:.3f}",
            "prefix_caching_hash_algo": "sha256",
            "sliding_window": str(self.model.sliding_window or None),
        }
        self.metrics = EngineMetrics(
            self.model_name,
            eng.max_model_len,
            cache_info,
            slo_ttft_s=spec.slo.ttft_ms / 1e3,
            slo_tpot_s=spec.slo.tpot_ms / 1e3,
        )
        self.scheduler = Scheduler(eng)
        self.engine: RealTimeEngine | None = None
        self.links: dict[str, PacedLink | KernelLink]
        self.links, self.scales = make_links(spec, self.topology, self.setup.instance, settings.shaping)
        self.dilation = spec.emulation.time_dilation  # link_plan already slowed the links D-fold
        self.api_path = ApiServerPath(self.setup.cost.profile.api, self.dilation)
        self.held_timers: dict[str, asyncio.TimerHandle] = {}
        # live changes towards one peer instance ("*" = every peer): the fault-injection hook
        self.peer_links: dict[str, PacedLink] = {}
        self.cut: set[str] = set()
        self.session: ClientSession | None = None
        self.exchanger: AfdExchanger | None = None
        if self.setup.pool.afd is not None and settings.peers:  # AFD: its experts' instances get the activations
            urls = dict(settings.peers)
            partners = afd_partners(spec, self.topology, self.setup.instance)
            missing = [p.name for p in partners if p.name not in urls]
            if missing:
                raise ValueError(f"instance {self.name}: no URL for its FFN instance(s) {', '.join(missing)} (--peers)")
            self.exchanger = AfdExchanger(
                [(p, urls[p.name]) for p in partners], self.topology, self.setup.instance, self.links, self.scales
            )
        self.kvstore: KVStoreClient | None = None
        stores = [(self.topology.by_name(n), u) for n, u in settings.peers if _role_of(self.topology, n) == "kvstore"]
        if stores and is_front(self.role) and eng.enable_prefix_caching:  # one store instance (its role's checks)
            policy = next(p.kvstore.write_policy for p in spec.pools if p.role == "kvstore")
            self.kvstore = KVStoreClient(
                stores[0], self.topology, self.setup.instance, self.links, self.scales, self.token, self.setup.cost,
                eng.block_size, policy, self.metrics, self.dilation,
            )  # fmt: skip
            if policy == "on-evict":
                self.scheduler.kv.pool.evicted = []
        self._drainer: asyncio.Task | None = None
        self.ready = False
        self.url = settings.url  # updated once the server knows its bound port
        # an injected hang: set = serving; cleared = every request (and the engine) waits, connections open
        self.running = asyncio.Event()
        self.running.set()

    # ---- lifecycle -------------------------------------------------------------
    async def start(self) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=None, sock_connect=5), connector=TCPConnector(limit=0))
        self.engine = RealTimeEngine(
            self.scheduler,
            self.setup.cost,
            self.metrics,
            self.setup.pool.pp,
            self._pull_kv,
            dilation=self.dilation,
            api_path=self.api_path,
            exchanger=self.exchanger,
        )
        if self.exchanger is not None:
            await self.exchanger.start()
        if self.kvstore is not None:
            await self.kvstore.start()
            if self.kvstore.write_policy == "on-evict":
                self._drainer = asyncio.ensure_future(self._drain_evictions())
        router = self.settings.cluster.spec.router
        self.engine.kv_timeout_s = router.timeouts.kv_transfer_ms * 1e-3 * self.dilation
        self.engine.recompute_on_kv_failure = router.pd_fallback == "recompute"
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        self.running.set()  # a hung worker still shuts down
        if self.engine is not None:
            await self.engine.close()
        if self.exchanger is not None:
            await self.exchanger.close()
        if self._drainer is not None:
            self._drainer.cancel()
        if self.kvstore is not None:
            await self.kvstore.close()
        if self.session is not None:
            await self.session.close()

    def _timing(self, req: Request, received: float, intake: float | None, admitted: float | None) -> dict:
        """Where this request's time went on this worker, in emulated ms: the modelled API intake, the
        KV-store fetch, the queue before its first step, and (P/D decode) the wait for its pulled KV."""
        d = 1e3 / self.dilation
        out = {}
        if intake is not None:
            out["api_ms"] = max(intake - received, 0.0) * d
            out["kv_fetch_ms"] = max((admitted or intake) - intake, 0.0) * d
        if req.first_scheduled_s is not None:
            base = req.kv_ready_s if req.kv_ready_s is not None else (admitted if admitted is not None else received)
            out["queue_ms"] = max(req.first_scheduled_s - base, 0.0) * d
        if req.kv_ready_s is not None:
            out["kv_pull_ms"] = max(req.kv_ready_s - received, 0.0) * d
            if req.first_token_s is not None:  # the decode's work before the client's first token
                out["head_ms"] = max(req.first_token_s - req.kv_ready_s, 0.0) * d
        return out

    # ---- the KV store ---------------------------------------------------------------
    async def _from_store(self, req: Request, start_at: float) -> float:
        """Look the prompt up while the modelled API server takes it in; fetch its next blocks when that
        beats computing them. Returns when the engine may see the request."""
        assert self.kvstore is not None and self.engine is not None
        loop = asyncio.get_running_loop()
        try:
            local, found, block_bytes = await self.kvstore.lookup(self.scheduler, req)
            if not found:
                return start_at
            await asyncio.sleep(max(start_at - loop.time(), 0.0))
            fetched = await asyncio.wait_for(
                self.kvstore.fetch(self.scheduler, req, local, found, block_bytes), self.engine.kv_timeout_s
            )
            return loop.time() if fetched else start_at
        except (OSError, ClientError, RuntimeError, ValueError, KeyError, asyncio.TimeoutError) as exc:
            self.metrics.store_failures.inc()
            log.warning("%s: KV store unavailable, computing the prompt (%s)", self.name, exc)
            return max(start_at, loop.time())

    async def _drain_evictions(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            assert self.kvstore is not None
            self.kvstore.drain_evictions(self.scheduler.kv.pool)

    def _prefilled(self, req: Request) -> None:
        if self.kvstore is not None and req.block_hashes:
            self.kvstore.prefill_done(req)

    # ---- KV transfer -------------------------------------------------------------
    def _tier_to(self, other_instance: str):
        me = self.setup.instance
        try:
            other = self.topology.by_name(other_instance)
        except KeyError:
            return self.topology.scale_out
        return self.topology.tier_between(me, other)

    async def _pull_kv(self, req: Request, source: dict) -> None:
        url = f"{source['remote_url']}/internal/kv/{source['remote_request_id']}"
        assert self.session is not None
        handoff = self.setup.cost.profile.api.pd_handoff_s  # the modelled hand-off path, as the simulator's
        if handoff > 0:
            await asyncio.sleep(handoff * self.dilation)
        async with self.session.get(url, params={"to": self.name}, headers=internal_headers(self.token)) as resp:
            # the transfer proper: from the sender's response (it then adds the latency and
            # streams the bytes) to the last byte; request set-up is not part of the link
            t0 = asyncio.get_running_loop().time()
            if resp.status != 200:
                raise RuntimeError(f"{url} answered {resp.status}: {(await resp.text())[:200]}")
            logical = float(resp.headers.get("X-Infemu-Logical-Bytes", "0"))
            tier = resp.headers.get("X-Infemu-Tier", "")
            async for _ in resp.content.iter_chunked(1 << 16):
                pass
        elapsed = asyncio.get_running_loop().time() - t0
        self.metrics.kv_bytes.inc(logical)
        self.metrics.kv_seconds.observe(elapsed / self.dilation)
        self.metrics.link(tier, "rx", logical)

    async def serve_kv(self, request: web.Request) -> web.StreamResponse:
        if not is_internal(request.headers, self.token):
            raise web.HTTPForbidden(
                text=json.dumps({"error": "KV is served to this cluster's workers only"}),
                content_type="application/json",
            )
        rid = request.match_info["rid"]
        held = self.scheduler.held.get(rid)
        if held is None:
            raise web.HTTPNotFound(
                text=json.dumps({"error": f"no KV held for request {rid}"}), content_type="application/json"
            )
        dst = request.query.get("to", "")
        tier = self._tier_to(dst)
        if dst in self.cut or "*" in self.cut:
            self._release(rid)
            raise web.HTTPServiceUnavailable(
                text=json.dumps({"error": f"link {self.name} -> {dst} is cut"}),
                content_type="application/json",
            )
        link = self.peer_links.get(dst) or self.peer_links.get("*") or self.links[tier.name]
        logical = self.setup.cost.kv_transfer_bytes(held.num_prompt_tokens)
        wire = max(1, math.ceil(logical / self.scales[tier.name]))
        resp = web.StreamResponse(
            headers={
                "X-Infemu-Logical-Bytes": str(logical),
                "X-Infemu-Tier": tier.name,
                "Content-Length": str(wire),
                "Content-Type": "application/octet-stream",
            }
        )
        try:
            await send_paced(request, resp, link, wire)
            self.metrics.link(tier.name, "tx", logical)
        finally:
            self._release(rid)
        return resp

    def _release(self, rid: str) -> None:
        timer = self.held_timers.pop(rid, None)
        if timer is not None:
            timer.cancel()
        self.scheduler.release_kv(rid)

    # ---- the OpenAI endpoints ---------------------------------------------------------
    async def generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        received = asyncio.get_running_loop().time()
        # the router's and launcher's own headers count only from inside the cluster: a client's
        # would skew the modelled API time, backdate its arrival or skip the engine altogether
        internal = is_internal(request.headers, self.token)
        if internal:
            overhead = request.headers.get(PATH_OVERHEAD_HEADER)
            if overhead is not None:
                try:
                    self.api_path.observe_path_overhead(float(overhead))
                except ValueError:
                    pass
            if request.headers.get(PROBE_HEADER):
                return await _probe(request, kind)
            received = stamped_arrival(request.headers, received)
        try:
            body = await read_json_object(request)
            g = parse_request(kind, body, self.model.vocab)
            if g.model != self.model_name:
                raise APIError(
                    404, f"The model `{g.model}` does not exist.", "model", "model_not_found", "NotFoundError"
                )
            return await self._run(request, g, received, internal)
        except APIError as exc:
            return _error(exc)

    async def _run(
        self, request: web.Request, g: GenerationRequest, received: float, internal: bool
    ) -> web.StreamResponse:
        assert self.engine is not None
        max_len = self.setup.engine.max_model_len
        n_prompt = len(g.prompt_ids)
        requested = g.max_tokens if g.max_tokens is not None else max(max_len - n_prompt, 1)
        if n_prompt + requested > max_len:
            raise APIError(
                400,
                f"This model's maximum context length is {max_len} tokens. However, you requested "
                f"{n_prompt + requested} tokens ({n_prompt} in the messages, {requested} in the "
                "completion). Please reduce the length of the messages or completion.",
                "max_tokens" if g.max_tokens else "messages",
                "context_length_exceeded",
            )
        seed = prompt_seed(g.prompt_ids)
        n_out = requested if g.ignore_eos else min(requested, synthetic_eos(seed, g.min_tokens))
        finish_reason = "length" if n_out == requested else "stop"
        stop_reason: str | int | None = None
        texts: list[str] | None = None  # each token's text where a stop string cut the answer, else None
        if g.stop or g.stop_token_ids:  # vLLM honours them with ignore_eos too; min_tokens comes first
            hit = stop_hit(seed, n_out, self.model.vocab, g.stop, g.stop_token_ids, g.min_tokens)
            if hit is not None:
                n_out, texts, stop_reason, finish_reason = hit.n_out, hit.texts, hit.reason, "stop"
        kv = g.kv_transfer_params or {}
        if kv and not internal:
            raise APIError(
                403,
                "kv_transfer_params are set by the cluster's router only",
                "kv_transfer_params",
                "forbidden",
                "PermissionDeniedError",
            )
        prefix = "chatcmpl" if g.kind == "chat" else "cmpl"
        rid = f"{prefix}-{g.request_id}"  # the engine's key: unique on this worker whatever callers send
        # the id the client reads: the caller's when it names one, so a P/D router can give the prefill's
        # first token and the decode's stream the same id
        named = caller_request_id(request)
        public = f"{prefix}-{named}" if named else rid
        hashes = (
            hashes_from_tokens(g.prompt_ids, self.setup.engine.block_size)
            if self.setup.engine.enable_prefix_caching
            else ()
        )
        now = received
        producer = (holds_kv_for_peer(self.role) or kv.get("do_remote_decode")) and n_out > 1
        consumer = bool(kv.get("do_remote_prefill")) and "remote_url" in kv
        if producer:
            req = Request(rid, n_prompt, n_out, now, hashes, kv_role="producer")
        elif consumer:
            req = Request(rid, n_prompt, n_out, now, hashes, kv_role="consumer")
        else:
            req = Request(rid, n_prompt, n_out, now, hashes)
        # the modelled API server takes the request in first (the simulator models it at the front door only)
        start_at = None if consumer else self.api_path.admit(received, n_prompt)
        intake = start_at
        if self.kvstore is not None and hashes and start_at is not None:
            start_at = await self._from_store(req, start_at)
        handle = self.engine.add(req, kv_source=kv if consumer else None, start_at=start_at)
        # the router's pipelines ask where a request's time went (internal callers only)
        timing = (
            (lambda: self._timing(req, received, intake, start_at))
            if internal and request.headers.get(TIMING_HEADER)
            else None
        )
        position = 0
        prefilled = consumer  # its prompt was computed on the prefill instance

        if not g.stream or producer:
            text_parts, reason, failure = [], None, None
            while True:
                ev: StreamEvent = await handle.queue.get()
                if not prefilled and ev.kind != "error":
                    prefilled = True
                    self._prefilled(req)
                if ev.kind == "tokens":
                    for _ in range(ev.count):
                        text_parts.append(
                            texts[position] if texts else output_token(seed, position, self.model.vocab)[1]
                        )
                        position += 1
                elif ev.kind == "finish":
                    reason = ev.reason
                    break
                else:
                    failure = ev
                    break
            if failure is not None:
                raise _refusal(failure)
            kv_params = None
            if reason == "remote_decode":
                kv_params = {
                    "do_remote_prefill": True,
                    "remote_url": self.url,
                    "remote_instance": self.name,
                    "remote_request_id": rid,
                    "prompt_tokens": n_prompt,
                }
                hold_s = KV_HOLD_TIMEOUT_S * self.dilation  # emulated seconds, as every modelled wait
                self.held_timers[rid] = asyncio.get_running_loop().call_later(hold_s, self._release, rid)
                out_reason = None
            else:
                out_reason = finish_reason
                self.metrics.success[finish_reason].inc()
            body = full_response(
                g,
                public,
                "".join(text_parts),
                out_reason,
                n_prompt,
                position,
                kv_params,
                stop_reason if out_reason else None,
            )
            if timing is not None:
                body["infemu_timing"] = timing()
            return web.json_response(body)

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            first = g.kind == "chat"
            counted = g.continuous_usage  # the running usage in every chunk (stream_options)
            if first:
                opening = stream_chunk(g, public, "", None, first=True, counts=(n_prompt, 0) if counted else None)
                await _sse(resp, opening)
            head, tail = token_chunk_frame(g, public)
            first_due = None
            transport = request.transport
            frame = body_framer(resp)

            def mark_prefilled(ev: StreamEvent) -> None:
                """The stream's first event (tokens or the end) marks the prompt done (a P/D decode's was
                computed on its prefill instance) and the first token's release."""
                nonlocal prefilled, first_due
                if first_due is None:
                    first_due = ev.at
                if not prefilled:
                    prefilled = True
                    self._prefilled(req)

            interval = self.settings.cluster.spec.engine.stream_interval
            due = 0  # tokens the engine produced that the modelled API server has not sent yet
            sent = False

            def tokens_due() -> bytes:
                """The due tokens as SSE events, one per token."""
                nonlocal position, due
                events = []
                for _ in range(due):
                    text = json_text(texts[position]) if texts else output_token_json(seed, position)
                    position += 1
                    events += (head, text, with_usage(tail, n_prompt, position) if counted else tail)
                due = 0
                return b"".join(events)

            def step_tokens(ev: StreamEvent) -> bytes:
                """What a step's tokens put on the wire now, as the API server sends them: the first token
                at once, then every ``interval`` tokens (the rest wait), as vLLM's --stream-interval does
                (``costmodel.engines.sending_tokens``); the events are built when they are sent."""
                nonlocal due, sent
                if not sent:  # the stream's first tokens (later ones find both marks set)
                    mark_prefilled(ev)
                due += ev.count
                if sent and due < interval:
                    return b""
                sent = True
                return tokens_due()

            def write_through(ev: StreamEvent) -> bool:
                """A step's tokens straight to the socket where the engine delivers them, framed as
                ``resp.write`` frames them, while the socket takes them: waking this task for every
                stream's every step cost more than the tokens, and the engine writes a step's first
                tokens ahead of its others. Anything else (the end, an error, a slow reader, a closed
                socket) goes to this task."""
                if (
                    ev.kind != "tokens"
                    or transport is None
                    or transport.is_closing()
                    or transport.get_write_buffer_size() > WRITE_THROUGH_LIMIT
                ):
                    handle.sink = None
                    return False
                data = step_tokens(ev)
                if data:
                    transport.write(frame(data))
                return True

            await resp.write(b"")  # the headers go now (as vLLM's server sends them), not with the first token
            if handle.queue.empty():
                handle.sink = write_through
            while True:
                ev = await handle.queue.get()
                if ev.kind == "tokens":  # one SSE event per token, one write per engine step (or stream interval)
                    data = step_tokens(ev)
                    if data:
                        await resp.write(data)
                    if handle.queue.empty():  # caught up again: later steps write through
                        handle.sink = write_through
                    continue
                if due:  # the stream ends: the tokens the stream interval held back go first
                    await resp.write(tokens_due())
                if ev.kind == "finish":
                    mark_prefilled(ev)
                    self.metrics.success[finish_reason].inc()
                    await _sse(
                        resp,
                        stream_chunk(
                            g,
                            public,
                            "" if g.kind != "chat" else None,
                            finish_reason,
                            stop_reason=stop_reason,
                            counts=(n_prompt, position) if counted else None,
                        ),
                    )
                    if g.include_usage:
                        await _sse(resp, usage_chunk(g, public, n_prompt, position))
                else:
                    await _sse(resp, _refusal(ev).body())
                break
            if timing is not None:  # an SSE comment: every client skips it
                await resp.write(b": infemu-timing " + json.dumps(timing()).encode() + b"\n\n")
            if first_due and internal and request.headers.get(FIRST_DUE_HEADER):
                await resp.write(FIRST_DUE_COMMENT + repr(first_due).encode() + b"\n\n")
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            # The client went away mid-stream (a benchmark's end, a router's cancelled attempt): as
            # vLLM does, the request is aborted and counted as one, and nothing is left to answer.
            # Raised on, aiohttp logged it as a server error with a traceback, ~1.5 ms of CPU each.
            self.engine.abort(rid)
            log.debug("request %s aborted: the client closed the stream", rid)
        except asyncio.CancelledError:
            self.engine.abort(rid)
            raise
        finally:
            handle.sink = None
        return resp

    # ---- small endpoints ---------------------------------------------------------------
    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(models_body(self.model_name, self.setup.engine.max_model_len))

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready_probe(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.ready else 503, text="ready" if self.ready else "starting")

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        if self.engine is not None:
            self.engine.sync_metrics()
        return web.Response(body=generate_latest(self.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def set_link(self, request: web.Request) -> web.Response:
        """POST /admin/link {"to": peer instance or "*", "bandwidth_factor": f, "latency_us": l, "cut": bool,
        "reset": bool}: degrade, delay or cut this instance's sending side towards a peer, live.
        Only from inside the cluster (``infemu link set`` carries the internal token)."""
        if not is_internal(request.headers, self.token):
            return _error(APIError(403, "link changes come from the cluster's tools only", None, "forbidden"))
        try:
            body = await read_json_object(request)
            to = str(body.get("to", "*"))
            if body.get("reset") and body.get("all"):  # every change towards every peer
                self.peer_links.clear()
                self.cut.clear()
                return web.json_response({"to": "*", "reset": True, "all": True})
            if body.get("reset"):
                self.peer_links.pop(to, None)
                self.cut.discard(to)
                return web.json_response({"to": to, "reset": True})
            tier = self._tier_to(to) if to != "*" else self.topology.scale_out
            base = self.links[tier.name]
            factor = float(body.get("bandwidth_factor", 1.0))
            if not 0 < factor <= 1e6:
                raise ValueError("bandwidth_factor must be > 0")
            latency = float(body["latency_us"]) * 1e-6 * self.dilation if "latency_us" in body else base.latency_s
            extra = float(body.get("extra_latency_us", 0.0))
            if not 0 <= extra <= 1e10 or not 0 <= latency <= 1e4:
                raise ValueError("latency must be >= 0 and finite")
            latency += extra * 1e-6 * self.dilation
        except APIError as exc:
            return _error(exc)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            return _error(APIError(400, f"bad link change: {exc}", None, "invalid_value"))
        if body.get("cut"):
            self.cut.add(to)
        else:
            self.cut.discard(to)
            link = self.peer_links.get(to)
            if link is None:
                link = self.peer_links[to] = PacedLink(f"{tier.name}->{to}", base.rate * factor, latency)
            else:
                link.set(rate_bytes_per_s=base.rate * factor, latency_s=latency)
        cut = to in self.cut
        wire = None if cut else self.peer_links[to].rate
        return web.json_response(
            {
                "to": to,
                "tier": tier.name,
                "cut": cut,
                "rate_bytes_per_s": wire,  # on the wire (byte-scaled, dilated)
                "latency_s": None if cut else self.peer_links[to].latency_s,
                # what the user asked for, in the emulated cluster's terms
                "logical_rate_bytes_per_s": None if cut else wire * self.scales[tier.name] * self.dilation,
                "byte_scale": self.scales[tier.name],
                "logical_latency_us": None if cut else self.peer_links[to].latency_s / self.dilation * 1e6,
            }
        )

    async def set_fault(self, request: web.Request) -> web.Response:
        """POST /admin/fault {"hang": bool} or {"slow": factor} or {"clear": true}: an injected GPU hang
        (nothing is stepped or answered; connections stay open) or slowdown (every step k times longer).
        GET answers the current state. Only from inside the cluster (the fault injector's token)."""
        if not is_internal(request.headers, self.token):
            return _error(APIError(403, "faults come from the cluster's tools only", None, "forbidden"))
        assert self.engine is not None
        if request.method == "POST":
            try:
                body = await read_json_object(request)
                hang = body.get("hang")
                slow = float(body.get("slow", self.engine.slowdown))
                if hang is not None and not isinstance(hang, bool):
                    raise ValueError("hang must be true or false")
                if not 1.0 <= slow <= 1000.0:
                    raise ValueError("slow must be a factor in [1, 1000]")
            except APIError as exc:
                return _error(exc)
            except (ValueError, TypeError, OverflowError) as exc:
                return _error(APIError(400, f"bad fault: {exc}", None, "invalid_value"))
            if body.get("clear"):
                hang, slow = False, 1.0
            self.engine.slowdown = slow
            self.metrics.set_fault("slow", slow > 1.0)
            if hang is True and self.running.is_set():
                log.warning("fault: hung (no step, no answer) until cleared")
                self.running.clear()
                self.engine.paused = True
            elif hang is False and not self.running.is_set():
                log.warning("fault: hang cleared")
                self.running.set()
                self.engine.resume()
            self.metrics.set_fault("hang", not self.running.is_set())
        return web.json_response({"hang": not self.running.is_set(), "slow": self.engine.slowdown})

    async def load(self, request: web.Request) -> web.Response:
        """What a router needs, without rendering every histogram (the router polls this at 10 Hz)."""
        s = self.scheduler.stats()
        return web.json_response(
            {
                "running": s.num_running,
                "waiting": s.num_waiting,
                "kv_usage": s.kv_usage,
                "num_gpu_blocks": s.num_gpu_blocks,
                "timing_error_ratio": self.engine.timing_error_ratio if self.engine else 0.0,
            }
        )

    async def info(self, request: web.Request) -> web.Response:
        inst = self.setup.instance
        return web.json_response(
            {
                "instance": inst.name,
                "role": inst.role,
                "pool": inst.pool,
                "gpus": list(inst.gpus),
                "node": inst.node,
                "domain": inst.domain,
                "num_gpu_blocks": self.setup.engine.num_gpu_blocks,
            }
        )


def models_body(model_name: str, max_model_len: int) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "id": model_name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "infemu",
                "root": model_name,
                "parent": None,
                "max_model_len": max_model_len,
            }
        ],
    }


async def _probe(request: web.Request, kind: str) -> web.StreamResponse:
    """One token at once, no engine and no modelled API server: the launcher times this to learn
    what the emulation's own HTTP path costs."""
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    field = '"delta":{"content":"x"}' if kind == "chat" else '"text":"x"'
    await resp.write(b'data: {"choices":[{"index":0,' + field.encode() + b',"finish_reason":"length"}]}\n\n')
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def body_framer(resp: web.StreamResponse) -> Callable[[bytes], bytes]:
    """How ``resp.write`` puts body bytes on the wire, as ``prepare()`` chose (an HTTP/1.1 chunk, or the
    bytes as they are), for a stream whose headers are out and whose bytes go straight to its socket."""
    if resp.headers.get("Transfer-Encoding") == "chunked":
        return lambda data: b"%x\r\n%b\r\n" % (len(data), data)
    return lambda data: data


async def _sse(resp: web.StreamResponse, obj: dict) -> None:
    await resp.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


def caller_request_id(request: web.Request) -> str | None:
    """The caller's X-Request-Id when it is a plain token (anything else is ignored, never echoed)."""
    value = request.headers.get(REQUEST_ID_HEADER)
    return value if value is not None and _REQUEST_ID.fullmatch(value) else None


def stamped_arrival(headers, received: float) -> float:
    """When an internal caller says the request reached the cluster (``X-Infemu-Arrival``, monotonic
    seconds: the router's receipt on a worker, ``infemu run``'s planned send time on the router), so
    the model counts from the front door, not from this hop. Only a stamp within the last second
    counts: one from another host's clock, or a caller's guess, falls back to this hop's receipt.
    Callers check ``is_internal`` first: a client's stamp would backdate its own arrival."""
    stamp = headers.get(ARRIVAL_HEADER)
    if stamp is None:
        return received
    try:
        t = float(stamp)
    except ValueError:
        return received
    return t if received - 1.0 < t <= received else received


def _error(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


def _refusal(ev: StreamEvent) -> APIError:
    """The engine's error event as the API answers it, with the event's status (400: the request can
    never run here; 503: the server failed it)."""
    kind = "BadRequestError" if ev.status < 500 else "ServiceUnavailable"
    return APIError(ev.status, ev.message or "request failed", None, "request_failed", kind)


WORKER = web.AppKey("worker", Worker)


@web.middleware
async def _hang(request: web.Request, handler):
    """An injected hang: every request but the fault endpoint waits, its connection open, as a stuck
    process's would (health checks time out; the router ejects it)."""
    worker = request.app[WORKER]
    if not worker.running.is_set() and request.path != "/admin/fault":
        await worker.running.wait()
    return await handler(request)


MAX_DETOKENIZE = 1_000_000  # token ids one /detokenize may carry (bounded memory)


def add_probe_routes(app: web.Application, model_name: str, max_model_len: int, vocab_size: int) -> None:
    """What OpenAI and vLLM clients probe besides generation: one model by id, the server's version,
    SageMaker's /ping (vLLM serves it too), and vLLM's /tokenize and /detokenize with the synthetic
    tokenizer every request is counted with."""

    async def one_model(request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model != model_name:
            return _error(
                APIError(404, f"The model `{model[:200]}` does not exist.", "model", "model_not_found", "NotFoundError")
            )
        return web.json_response(models_body(model_name, max_model_len)["data"][0])

    async def version(request: web.Request) -> web.Response:
        return web.json_response({"version": package_version()})

    async def ping(request: web.Request) -> web.Response:
        return web.json_response({})

    async def tokenize_route(request: web.Request) -> web.Response:
        try:
            body = await read_json_object(request)
            if isinstance(body.get("messages"), list):
                ids = tokenize(chat_prompt(body["messages"], chat_tools(body)), vocab_size)
            elif isinstance(body.get("prompt"), str):
                ids = tokenize(body["prompt"], vocab_size)
            else:
                raise APIError(400, "give 'prompt' (a string) or 'messages'", "prompt", "missing_required_parameter")
        except APIError as exc:
            return _error(exc)
        return web.json_response({"count": len(ids), "max_model_len": max_model_len, "tokens": ids})

    async def detokenize_route(request: web.Request) -> web.Response:
        try:
            body = await read_json_object(request)
            ids = body.get("tokens")
            valid = isinstance(ids, list) and len(ids) <= MAX_DETOKENIZE
            if not valid or not all(type(t) is int and 0 <= t < vocab_size for t in ids):
                raise APIError(
                    400,
                    f"'tokens' must be a list of at most {MAX_DETOKENIZE} token ids in [0, {vocab_size})",
                    "tokens",
                    "invalid_value",
                )
        except APIError as exc:
            return _error(exc)
        return web.json_response({"prompt": detokenize(ids)})

    app.router.add_post("/tokenize", tokenize_route)
    app.router.add_post("/detokenize", detokenize_route)
    app.router.add_get("/v1/models/{model:.+}", one_model)
    app.router.add_get("/version", version)
    app.router.add_get("/ping", ping)
    app.router.add_post("/ping", ping)


@web.middleware
async def json_errors(request: web.Request, handler):
    """Unknown routes and methods answer in OpenAI's error format too."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return _error(APIError(exc.status, exc.reason, None, None, "invalid_request_error"))
        raise


def _role_of(topo: Topology, name: str) -> str | None:
    return next((i.role for i in topo.instances if i.name == name), None)


def create_app(settings: WorkerSettings) -> web.Application:
    topo = place(settings.cluster.spec)
    member = named_instance(settings, list(topo.instances))
    if member is not None and not get_role(member.role).engine:  # a service of its own (ffn, rag, kvstore)
        return service_factory(member.role)(settings.cluster, member, topo, settings.shaping)
    app = web.Application(middlewares=[_hang, json_errors], client_max_size=64 * 1024 * 1024)
    worker = Worker(settings)
    app[WORKER] = worker

    async def lifecycle(app: web.Application):
        await worker.start()
        yield
        await worker.stop()

    app.cleanup_ctx.append(lifecycle)

    async def completions(request: web.Request) -> web.StreamResponse:
        return await worker.generate(request, "completion")

    async def chat(request: web.Request) -> web.StreamResponse:
        return await worker.generate(request, "chat")

    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", worker.models)
    add_probe_routes(app, worker.model_name, worker.setup.engine.max_model_len, worker.model.vocab)
    app.router.add_get("/health", worker.health)
    app.router.add_get("/ready", worker.ready_probe)
    app.router.add_get("/metrics", worker.metrics_endpoint)
    app.router.add_get("/internal/kv/{rid}", worker.serve_kv)
    app.router.add_get("/internal/info", worker.info)
    app.router.add_get("/load", worker.load)
    app.router.add_post("/admin/link", worker.set_link)
    app.router.add_post("/admin/fault", worker.set_fault)
    app.router.add_get("/admin/fault", worker.set_fault)
    return app
