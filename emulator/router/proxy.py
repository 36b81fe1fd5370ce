"""The OpenAI front door: routes each request to a backend and streams the answer back.

Guarantees: a request is retried on another backend only before its first byte
reached the client, within a retry budget; once tokens were streamed, a backend
failure, a stalled stream or the request's deadline ends the stream with an
explicit ``data: {"error": ...}`` event and ``[DONE]`` — no client hangs, and every
wait is bounded (``router.timeouts``). Past the admission limits the router answers
429/503 with ``Retry-After`` at once. A client's bad request is its own 4xx and never
counts against a backend.
With P/D pools the router orchestrates as vLLM's P/D proxy and NVIDIA Dynamo do: the
prefill instance (chosen by load) computes the prompt and returns ``kv_transfer_params``
(its one sampled token is not the client's); the decode instance (chosen by load and free
KV) pulls the KV from that prefill instance and streams the whole answer, its first token
included, so the client's TTFT covers the hand-off, the pull and the decode's first step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from emulator.engine.hashing import hashes_from_tokens
from emulator.roles import front_roles, names
from emulator.router.backends import Backend, BackendPool
from emulator.router.pipeline import PipelineRunner
from emulator.router.policies import KVAware, NoEndpointError, RoutingRequest, make_policy
from emulator.router.resilience import Resilience, RetryBudget, overloaded
from emulator.router.upstream import Answer, NoFirstByte, UpstreamError, UpstreamPool
from emulator.serve.app import (
    ARRIVAL_HEADER,
    FIRST_DUE_HEADER,
    PATH_OVERHEAD_HEADER,
    PROBE_HEADER,
    REQUEST_ID_HEADER,
    TIMING_HEADER,
    add_probe_routes,
    body_framer,
    caller_request_id,
    json_errors,
    models_body,
    stamped_arrival,
)
from emulator.serve.internal import cluster_token, internal_headers, is_internal
from emulator.serve.protocol import APIError, chat_tools, read_json_object
from emulator.serve.tokens import chat_prompt, tokenize
from emulator.spec import RouterSpec

log = logging.getLogger("infemu.router")
FRONT = front_roles()  # a request's first leg (aggregated, prefill, attention)
PRODUCERS = names(lambda r: r.kv_producer)  # P/D prefill
CONSUMERS = names(lambda r: r.kv_consumer)  # P/D decode
SESSION_HEADER = "X-Session-Id"


class BackendFailed(Exception):
    """The backend could not be reached or answered 5xx before any byte went to the client."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused  # nothing listens (a killed process): eject at once


class ClientGone(Exception):
    """The client closed its connection: stop relaying (the backend then aborts); not a backend fault."""


class Rejected(Exception):
    """Admission control: answered at once with 429/503 and Retry-After instead of queueing."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class RouterSettings:
    model_name: str
    max_model_len: int
    policy: str
    backends: tuple[tuple[str, str, str], ...]  # (name, role, url)
    vocab_size: int = 128256
    block_size: int = 16
    slo_ttft_s: float = 1.0
    slo_tpot_s: float = 0.1
    # health checks, circuit breaking, retries, timeouts, admission (the spec's router section)
    resilience: RouterSpec = field(default_factory=RouterSpec)
    dilation: float = 1.0  # the spec's durations are emulated: wall = D x emulated
    retrievers: tuple[tuple[str, str], ...] = ()  # (name, url) of the rag instances
    slo_e2e_s: float | None = None  # slo.e2eMs in wall seconds (a pipeline's end-to-end bound)


class Router:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.token = cluster_token()  # proves to the workers that a request comes from inside the cluster
        self.res = Resilience.from_spec(settings.resilience, settings.dilation)
        self.pool = BackendPool([Backend(n, r, u) for n, r, u in settings.backends], self.res.health)
        self.budget = RetryBudget(self.res.retry_percent, self.res.retry_min_per_s)
        self.in_flight = 0
        self.policy = make_policy(settings.policy)
        self.decode_policy = KVAware()
        self.pd = bool(self.pool.by_role(*CONSUMERS))
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "infemu_router_requests", "Requests by backend and outcome.", ["backend", "outcome"], registry=self.registry
        )
        self.retries = Counter("infemu_router_retries", "Requests retried on another backend.", registry=self.registry)
        # the emulation's own HTTP path (client -> router -> worker -> router -> client), measured by the
        # launcher with probe requests; workers start requests that much earlier inside the modelled API
        # server's time, so the real path is not paid on top of the modelled one
        self.path_overhead_s = 0.0
        self.healthy = Gauge(
            "infemu_router_backend_healthy", "1 when the backend is admitted.", ["backend"], registry=self.registry
        )
        self.slo_requests = Counter(
            "infemu_router_slo_requests",
            "Requests as the router saw them end: met=true when TTFT and TPOT both met their SLOs (DistServe's"
            " per-request attainment, which two histograms cannot give).",
            ["model_name", "met"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "infemu_router_rejections",
            "Requests answered at once by admission control (429/503 with Retry-After), by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.ejections = Counter(
            "infemu_router_ejections",
            "Backends ejected, by reason: health_check, refused, circuit_breaker.",
            ["backend", "reason"],
            registry=self.registry,
        )
        self.timeouts = Counter(
            "infemu_router_timeouts",
            "Waits that ran out, by stage: first_byte, idle (a stalled stream), deadline, client_write.",
            ["stage"],
            registry=self.registry,
        )
        self.budget_exhausted = Counter(
            "infemu_router_retry_budget_exhausted", "Retries refused by the retry budget.", registry=self.registry
        )
        self.fault_active = Gauge(
            "infemu_fault_active",
            "1 while an injected fault is active (the chaos run's annotation, posted by the fault injector).",
            ["fault", "kind"],
            registry=self.registry,
        )
        self.pool.on_eject = lambda b, reason: self.ejections.labels(b.name, reason).inc()
        self.session: ClientSession | None = None  # the router's own calls: retrievers, pipeline stages
        self.upstream: UpstreamPool | None = None  # the requests it routes: answers relayed as they arrive
        self.pipelines = PipelineRunner(self, list(settings.retrievers), self.registry)

    async def start(self) -> None:
        # no pool limit: aiohttp's default of 100 connections would silently cap the requests in flight
        self.session = ClientSession(
            timeout=ClientTimeout(total=None, sock_connect=self.res.connect_s, sock_read=None),
            connector=TCPConnector(limit=0),
        )
        self.upstream = UpstreamPool(self.res.connect_s)
        await self.pool.start()

    async def stop(self) -> None:
        await self.pool.stop()
        if self.upstream is not None:
            self.upstream.close()
        if self.session is not None:
            await self.session.close()

    # ---- choosing ---------------------------------------------------------------
    def _routing_request(self, body: dict, request: web.Request) -> RoutingRequest:
        session = request.headers.get(SESSION_HEADER) or (
            body.get("user") if isinstance(body.get("user"), str) else None
        )
        hashes: tuple[int, ...] = ()
        if self.settings.policy == "prefix_affinity":
            prompt = body.get("prompt")
            if isinstance(body.get("messages"), list):
                try:  # the worker refuses a malformed request with a 400; routing reads well-formed ones only
                    ids = tokenize(chat_prompt(body["messages"], chat_tools(body)), self.settings.vocab_size)
                except (APIError, AttributeError, TypeError):
                    ids = []
            elif isinstance(prompt, str):
                ids = tokenize(prompt, self.settings.vocab_size)
            elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                ids = prompt
            else:
                ids = []
            hashes = hashes_from_tokens(ids[: 4 * self.settings.block_size], self.settings.block_size)
        return RoutingRequest(request_id="", block_hashes=hashes, session=session)

    def _choose(
        self, candidates: list[Backend], rr: RoutingRequest, exclude: set[str], decode: bool = False
    ) -> Backend:
        pool = [b for b in candidates if b.name not in exclude]
        if not pool:
            raise NoEndpointError("no healthy backend")
        snaps = [b.snapshot() for b in pool]
        policy = self.decode_policy if decode else self.policy
        return pool[policy.choose(snaps, rr)]

    # ---- endpoints ------------------------------------------------------------------
    async def generate(self, request: web.Request) -> web.StreamResponse:
        received = asyncio.get_running_loop().time()
        try:
            body = await read_json_object(request)
        except APIError as exc:
            return _error(exc)
        raw: bytes | None = await request.read()  # cached by aiohttp: the same bytes, read once
        if "kv_transfer_params" in body:
            # only the router hands out KV-transfer parameters (they make a worker connect to the
            # named peer): a client's are dropped at the front door, and the body is re-encoded
            body = {k: v for k, v in body.items() if k != "kv_transfer_params"}
            raw = None
        if body.get("model") != self.settings.model_name:
            if not isinstance(body.get("model"), str):
                return _error(APIError(400, "'model' is required", "model", "missing_required_parameter"))
            return _error(
                APIError(
                    404, f"The model `{body.get('model')}` does not exist.", "model", "model_not_found", "NotFoundError"
                )
            )
        rr = self._routing_request(body, request)
        state = _ClientStream(request, bool(body.get("stream")))
        internal = is_internal(request.headers, self.token)
        # `infemu run`'s client (it holds the cluster token) stamps when it sent the request: the
        # client -> router hop is the emulation's, not the model's
        state.arrival = stamped_arrival(request.headers, received) if internal else received
        # the launcher's path probe (it carries the cluster token); from anyone else the header is ignored
        state.probe = bool(request.headers.get(PROBE_HEADER)) and internal
        # the router's own pipelines ask the workers where each stage's time went
        state.timing = bool(request.headers.get(TIMING_HEADER)) and internal
        if internal:
            self._client_path_report(request.headers)
            state.first_due = bool(request.headers.get(FIRST_DUE_HEADER))
        state.write_timeout_s = self.res.client_write_s
        if self.in_flight >= self.res.max_in_flight:
            return self._reject(Rejected("router_full", f"the router holds {self.in_flight} requests, its limit"))
        self.in_flight += 1
        self.budget.record_request(received)
        try:
            return await asyncio.wait_for(self._dispatch(request, body, rr, state, raw), self.res.request_s)
        except asyncio.TimeoutError:
            self.timeouts.labels("deadline").inc()
            return await state.fail(
                APIError(
                    504,
                    f"the request's deadline ({self.res.request_s:.1f} s) passed",
                    None,
                    "deadline_exceeded",
                    "Timeout",
                )
            )
        except Exception as exc:  # a defect here: still an explicit error for the client, and the trace in the log
            log.exception("the router failed on request %s", state.request_id)
            self.requests.labels("-", "router_error").inc()
            return await state.fail(
                APIError(
                    500, f"the router failed: {type(exc).__name__}: {exc}", None, "router_error", "InternalServerError"
                )
            )
        finally:
            self.in_flight -= 1
            self._account(state)

    def _reject(self, exc: Rejected) -> web.Response:
        self.rejections.labels(exc.reason).inc()
        status = self.res.reject_status
        err = APIError(
            status,
            f"{exc}; retry after {self.res.retry_after_s} s",
            None,
            "overloaded",
            "rate_limit_exceeded" if status == 429 else "ServiceUnavailable",
        )
        return web.json_response(err.body(), status=status, headers={"Retry-After": str(self.res.retry_after_s)})

    def _admit(self, candidates: list[Backend]) -> None:
        if overloaded(candidates, self.res.max_waiting):
            raise Rejected(
                "overloaded", f"every backend has {self.res.max_waiting} or more requests waiting (router.admission)"
            )

    def _may_retry(self) -> bool:
        if self.budget.try_retry(asyncio.get_running_loop().time()):
            self.retries.inc()
            return True
        self.budget_exhausted.inc()
        return False

    def _account(self, state: _ClientStream) -> None:
        """Count the request against the SLOs as the router saw it (first token and end of stream).
        The launcher's path probes are not user requests: they would inflate every attainment."""
        if state.probe:
            return
        end = asyncio.get_running_loop().time()
        ok = state.ok and state.tokens > 0 if state.stream else state.ok
        first = state.first_token_at if state.stream else end
        met = False
        if ok and first is not None and state.arrival:
            ttft = first - state.arrival
            tpot = (state.last_token_at - first) / (state.tokens - 1) if state.stream and state.tokens > 1 else 0.0
            met = ttft <= self.settings.slo_ttft_s and tpot <= self.settings.slo_tpot_s
        self.slo_requests.labels(self.settings.model_name, "true" if met else "false").inc()

    async def _dispatch(self, request, body, rr, state, raw) -> web.StreamResponse:
        try:
            # a P/D client sees its first token when the prefill leg returns: the launcher's path probe measures
            # that round trip (one prefill instance answering at once), not the prefill's modelled work
            if self.pd and not state.probe:
                return await self._pd(request.path, body, rr, state)
            return await self._single(request.path, body, rr, state, raw)
        except ClientGone:
            self.requests.labels("-", "client_gone").inc()
            if state.write_timed_out:
                self.timeouts.labels("client_write").inc()
            return state.resp or web.Response(status=499)
        except Rejected as exc:
            if state.started:
                return await state.fail(APIError(503, str(exc), None, "overloaded", "ServiceUnavailable"))
            return self._reject(exc)
        except NoEndpointError:
            return await state.fail(
                APIError(503, "no healthy backend can serve this request", None, "no_backend", "ServiceUnavailable")
            )
        except BackendFailed as exc:
            return await state.fail(APIError(502, str(exc), None, "backend_failed", "ServiceUnavailable"))
        except (ClientError, UpstreamError) as exc:  # a backend's connection broke where no path above converted it
            log.exception("backend connection broke outside the relay")
            return await state.fail(
                APIError(502, f"a backend failed: {exc}", None, "backend_failed", "ServiceUnavailable")
            )

    async def _single(
        self, path: str, body: dict, rr: RoutingRequest, state: _ClientStream, raw: bytes | None = None
    ) -> web.StreamResponse:
        tried: set[str] = set()
        front = [b for b in self.pool.by_role(*FRONT) if b.healthy]
        self._admit(front)
        for attempt in range(self.res.max_attempts):
            if attempt:
                front = [b for b in self.pool.by_role(*FRONT) if b.healthy]
            backend = self._choose(front, rr, tried)
            tried.add(backend.name)
            try:
                return await self._relay(backend, path, body, state, raw=raw)
            except BackendFailed as exc:
                log.warning("backend %s failed before the first byte: %s", backend.name, exc)
                self.requests.labels(backend.name, "retried").inc()
                if attempt + 1 >= self.res.max_attempts or not self._may_retry():
                    break
        return await state.fail(
            APIError(503, "every backend tried failed", None, "backend_failed", "ServiceUnavailable")
        )

    async def _relay(
        self,
        backend: Backend,
        path: str,
        body: dict,
        state: _ClientStream,
        raw: bytes | None = None,
    ) -> web.StreamResponse:
        """Forward body to backend and relay its answer; BackendFailed only while nothing was sent.
        Every failure of the backend (not of the request) is reported to the circuit breaker."""
        backend.in_flight += 1
        try:
            return await self._relay_once(backend, path, body, state, raw)
        except BackendFailed as exc:
            self.pool.mark_failed(backend, refused=exc.refused)
            raise
        finally:
            backend.in_flight -= 1

    def _headers(self, state: _ClientStream, probe: bool) -> dict[str, str]:
        """The router's own headers on a backend request (trusted by workers through the cluster token):
        the path overhead, the one request id, the receipt time, and the probe mark."""
        headers = {
            PATH_OVERHEAD_HEADER: repr(self.path_overhead_s),
            REQUEST_ID_HEADER: state.request_id,
            **internal_headers(self.token),
        }
        if state.arrival:
            headers[ARRIVAL_HEADER] = repr(state.arrival)
        if probe:
            headers[PROBE_HEADER] = "1"
        if state.timing:
            headers[TIMING_HEADER] = "1"
        if state.first_due:
            headers[FIRST_DUE_HEADER] = "1"
        return headers

    def _client_path_report(self, headers) -> None:
        """`infemu run`'s client measures, from the first tokens it reads, how long the way back from a
        worker's release takes under the run's load, and sends its current estimate with each request:
        it replaces the launcher's idle measurement (``emulator.serve.api_path``)."""
        value = headers.get(PATH_OVERHEAD_HEADER)
        if value is None:
            return
        try:
            self.path_overhead_s = _seconds(value)
        except (ValueError, OverflowError):
            pass  # an absurd report is ignored, as the workers ignore one

    async def _open(
        self,
        backend: Backend,
        path: str,
        body: dict,
        state: _ClientStream,
        raw: bytes | None,
        streamed: bool | None = None,
        probe: bool | None = None,
    ) -> Answer:
        """POST to the backend and wait for its answer's headers, within the first-byte timeout when the
        answer is ``streamed`` (the client's choice unless told)."""
        assert self.upstream is not None
        if backend.unreachable:
            raise BackendFailed(f"{backend.name} is partitioned from the router", refused=True)
        headers = self._headers(state, probe=state.probe if probe is None else probe)
        data = raw if raw is not None else json.dumps(body).encode()  # unchanged: the client's own bytes
        # a non-streamed answer comes whole at the end: only the request's deadline bounds it
        wait = self.res.first_byte_s if (state.stream if streamed is None else streamed) else None
        head_by = None if wait is None else asyncio.get_running_loop().time() + wait
        try:
            return await self.upstream.post(backend.url, path, data, headers, head_by)
        except UpstreamError as exc:
            raise BackendFailed(f"{backend.name}: {exc}", refused=exc.refused) from None
        except asyncio.TimeoutError:
            self.timeouts.labels("first_byte").inc()
            raise BackendFailed(f"{backend.name} sent no response within {wait:.1f} s") from None

    async def _relay_once(
        self, backend: Backend, path: str, body: dict, state: _ClientStream, raw: bytes | None
    ) -> web.StreamResponse:
        # a worker sends its stream's headers at once (as vLLM does): the first-byte deadline holds
        # until the stream's first body byte, which a request still in its prefill has not sent
        first_by = asyncio.get_running_loop().time() + self.res.first_byte_s
        resp = await self._open(backend, path, body, state, raw)
        async with resp:
            whole = resp.status >= 400 or "text/event-stream" not in resp.headers.get("content-type", "")
            try:
                data = await resp.read() if whole else b""
            except OSError as exc:  # it died while answering (UpstreamError)
                raise BackendFailed(f"{backend.name} broke off its answer: {exc}") from None
            if resp.status >= 500:
                raise BackendFailed(f"status {resp.status}: {_message_of(data)}")
            if whole:
                # a 4xx is the client's own error: the backend is healthy
                self.pool.mark_ok(backend)
                self.requests.labels(backend.name, "ok" if resp.status < 400 else "client_error").inc()
                return await state.whole(data, resp.status)
            try:
                await resp.relay(state.write_now, state.write, self.res.idle_s, first_by)
            except NoFirstByte:
                self.timeouts.labels("first_byte").inc()
                raise BackendFailed(f"{backend.name} sent no response within {self.res.first_byte_s:.1f} s") from None
            except (asyncio.TimeoutError, UpstreamError) as exc:
                stalled = isinstance(exc, asyncio.TimeoutError)
                if stalled:
                    self.timeouts.labels("idle").inc()
                why = f"no byte for {self.res.idle_s:.1f} s" if stalled else str(exc)
                if not state.started:
                    raise BackendFailed(why) from None
                self.requests.labels(backend.name, "broken_stream").inc()
                self.pool.mark_failed(backend)
                return await state.fail(
                    APIError(
                        502,
                        f"backend {backend.name} failed mid-stream: {why}",
                        None,
                        "backend_failed",
                        "ServiceUnavailable",
                    )
                )
            if not state.done:
                if not state.started:
                    raise BackendFailed("empty stream")
                self.requests.labels(backend.name, "broken_stream").inc()
                self.pool.mark_failed(backend)
                return await state.fail(
                    APIError(
                        502,
                        f"backend {backend.name} ended the stream early",
                        None,
                        "backend_failed",
                        "ServiceUnavailable",
                    )
                )
            self.pool.mark_ok(backend)
            self.requests.labels(backend.name, "ok").inc()
            return await state.finish()

    async def _pd(self, path: str, body: dict, rr: RoutingRequest, state: _ClientStream) -> web.StreamResponse:
        """Prefill by load, then decode by load and free KV; the decode pulls the KV from that prefill.
        A decode that fails before sending a byte is replaced by another (its pull then finds the KV,
        or recomputes the prompt when the prefill is gone: router.pdFallback); after that, an
        explicit error event ends the stream."""
        prefill_body = {**body, "stream": False, "kv_transfer_params": {"do_remote_decode": True}}
        prefill_body.pop("stream_options", None)
        first = await self._prefill(path, prefill_body, rr, state)
        if isinstance(first, web.StreamResponse):  # the client was answered (its error, or every prefill failed)
            return first
        kv = first.get("kv_transfer_params")
        if not kv:  # a one-token answer: the prefill instance finished it
            return await state.from_complete(first, body)
        decode_body = {**body, "kv_transfer_params": kv}
        if state.stream and state.timing and first.get("infemu_timing"):
            # the prefill leg's account, as an SSE comment ahead of the decode's first bytes (held until then:
            # a decode that fails before sending any is still replaced by another)
            state.hold(b": infemu-timing-prefill " + json.dumps(first["infemu_timing"]).encode() + b"\n\n")
        inner = state
        if not state.stream:
            inner = _ClientStream(state.request, False, capture=True)
            inner.request_id = state.request_id
        inner.arrival = 0.0  # the decode step is not backdated: the KV pull starts now
        tried: set[str] = set()
        routing = RoutingRequest("", rr.block_hashes, rr.session)
        for attempt in range(self.res.max_attempts):
            decodes = [b for b in self.pool.by_role(*CONSUMERS) if b.healthy]
            d = self._choose(decodes, routing, tried, decode=True)
            tried.add(d.name)
            try:
                relayed = await self._relay(d, path, decode_body, inner)
                break
            except BackendFailed as exc:
                log.warning("decode %s failed before its first byte: %s", d.name, exc)
                self.requests.labels(d.name, "retried").inc()
                if attempt + 1 >= self.res.max_attempts or not self._may_retry():
                    return await state.fail(
                        APIError(502, f"decode {d.name} failed: {exc}", None, "backend_failed", "ServiceUnavailable")
                    )
        if state.stream:
            return relayed
        return await state.whole(inner.captured, inner.captured_status)  # the decode's answer is the whole one

    async def _prefill(
        self, path: str, prefill_body: dict, rr: RoutingRequest, state: _ClientStream
    ) -> dict | web.StreamResponse:
        """The prefill leg: its answer, or the response that already answered the client."""
        tried: set[str] = set()
        prefills = [b for b in self.pool.by_role(*PRODUCERS) if b.healthy]
        self._admit(prefills)
        for attempt in range(self.res.max_attempts):
            if attempt:
                prefills = [b for b in self.pool.by_role(*PRODUCERS) if b.healthy]
            p = self._choose(prefills, rr, tried)
            tried.add(p.name)
            p.in_flight += 1
            try:
                # a whole answer (the first token and the KV's whereabouts); the decode stream carries its id
                resp = await self._open(p, path, prefill_body, state, None, streamed=False, probe=False)
                async with resp:
                    data = await resp.read()
                    if resp.status >= 500:
                        raise BackendFailed(f"status {resp.status}: {_message_of(data)}")
                    if resp.status >= 400:  # the client's own error
                        self.pool.mark_ok(p)
                        return await state.whole(data, resp.status)
                    first = json.loads(data)
                self.pool.mark_ok(p)
                self.requests.labels(p.name, "ok").inc()
                return first
            except (BackendFailed, OSError, ValueError) as exc:
                log.warning("prefill %s failed: %s", p.name, exc)
                self.pool.mark_failed(p, refused=isinstance(exc, BackendFailed) and exc.refused)
                self.requests.labels(p.name, "retried").inc()
                if attempt + 1 >= self.res.max_attempts or not self._may_retry():
                    break
            finally:
                p.in_flight -= 1
        return await state.fail(
            APIError(503, "every prefill backend tried failed", None, "backend_failed", "ServiceUnavailable")
        )

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(models_body(self.settings.model_name, self.settings.max_model_len))

    async def set_path_overhead(self, request: web.Request) -> web.Response:
        """POST /admin/path-overhead {"seconds": s}: the launcher's measurement of the emulation's own
        HTTP round trip, passed on to the workers with every request. Only from the launcher."""
        if not is_internal(request.headers, self.token):
            return _error(APIError(403, "the path overhead is set by the launcher only", None, "forbidden"))
        try:
            self.path_overhead_s = _seconds((await read_json_object(request))["seconds"])
        except APIError as exc:
            return _error(exc)
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            return _error(APIError(400, f"bad path overhead: {exc}", "seconds", "invalid_value"))
        return web.json_response({"seconds": self.path_overhead_s})

    async def set_fault(self, request: web.Request) -> web.Response:
        """POST /admin/fault from the fault injector: {"unreachable": [backends]} cuts the router off
        from those backends (a partition; [] heals it); {"annotate": name, "kind": k, "active": bool}
        sets the ``infemu_fault_active`` annotation. GET: the backends' health as the router sees it."""
        if not is_internal(request.headers, self.token):
            return _error(APIError(403, "faults come from the cluster's tools only", None, "forbidden"))
        if request.method == "POST":
            try:
                body = await read_json_object(request)
                if "unreachable" in body:
                    names = body["unreachable"]
                    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                        raise ValueError("unreachable must be a list of backend names")
                    for b in self.pool.backends:
                        b.unreachable = b.name in names
                if "annotate" in body:
                    name, kind = str(body["annotate"])[:64], str(body.get("kind", ""))[:32]
                    self.fault_active.labels(name, kind).set(1 if body.get("active") else 0)
            except APIError as exc:
                return _error(exc)
            except (ValueError, TypeError, KeyError) as exc:
                return _error(APIError(400, f"bad fault: {exc}", None, "invalid_value"))
        return web.json_response(
            {
                b.name: {
                    "healthy": b.healthy,
                    "checked": b.checked,
                    "ejected_for_s": max(0.0, b.ejected_until - time.monotonic()),
                    "unreachable": b.unreachable,
                    "in_flight": b.in_flight,
                }
                for b in self.pool.backends
            }
        )

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        ok = any(b.healthy for b in self.pool.by_role(*FRONT))
        if self.pd:
            ok = ok and any(b.healthy for b in self.pool.by_role(*CONSUMERS))
        return web.Response(status=200 if ok else 503, text="ready" if ok else "no healthy backend")

    async def metrics(self, request: web.Request) -> web.Response:
        for b in self.pool.backends:
            self.healthy.labels(b.name).set(1 if b.healthy else 0)
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


_timeout = getattr(asyncio, "timeout", None)  # Python 3.11+: a rescheduled deadline, no task per await


class _ClientStream:
    """What the client has been sent so far: decides between retrying and an explicit error."""

    def __init__(self, request: web.Request, stream: bool, capture: bool = False) -> None:
        self.request = request
        self.stream = stream
        self.capture = capture
        # one id for the whole completion, given to every backend that works on it
        self.request_id = caller_request_id(request) or uuid.uuid4().hex
        self.probe = False
        self.timing = False  # ask the workers for their timing account (the router's pipelines)
        self.first_due = False  # ask the worker when the model released the first token (`infemu run`'s client)
        self.write_timeout_s: float | None = None  # a client that takes no bytes this long is cut off
        self.write_timed_out = False
        self._low_water: int | None = None
        self._frame = None  # body_framer(resp) once the response is prepared
        self.resp: web.StreamResponse | None = None
        self.started = False
        self.done = False
        self.captured = b""
        self.captured_status = 0
        self.arrival = 0.0
        self.first_token_at: float | None = None
        self.last_token_at = 0.0
        self.tokens = 0
        self.ok = False
        self._held = b""  # bytes that go out with the first write (the client is told nothing before)
        self._now = asyncio.get_running_loop().time

    def hold(self, data: bytes) -> None:
        """Send ``data`` ahead of the first bytes written, not now: until then a failed backend may still
        be replaced by another, which only an untouched response allows."""
        self._held += data

    async def _prepare(self) -> web.StreamResponse:
        if self.resp is None:
            self.resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await self.resp.prepare(self.request)
            self._frame = body_framer(self.resp)
            if (transport := self.request.transport) is not None:
                self._low_water = transport.get_write_buffer_limits()[0]
        return self.resp

    def write_now(self, line: bytes) -> bool:
        """Write ``line`` straight to the client's socket if that cannot wait (the headers are out, nothing
        is held and the socket takes it without pausing), framed as ``resp.write`` frames it; False leaves
        it to ``write``. The relay calls this where a backend's block is parsed: a coroutine per block cost
        more than the write.

        Such a write cannot wait: aiohttp's write waits only while the transport has paused its writers,
        which it does past its high-water mark and undoes at its low-water mark, so a transport at or
        below the low mark is not paused, and a write that keeps it there does not pause it."""
        if not self.started or self._held:
            return False
        transport, low = self.request.transport, self._low_water
        if transport is None or low is None or transport.get_write_buffer_size() + len(line) > low:
            return False  # the client is gone, or its socket is backed up: the awaited write decides
        if transport.is_closing():
            raise ClientGone("the client closed the connection")
        transport.write(self._frame(line))
        self._sent(line)
        return True

    async def write(self, line: bytes) -> None:
        if self._held:
            line, self._held = self._held + line, b""
        if self.write_now(line):  # the socket takes it without pausing: no coroutine of aiohttp's
            return
        try:
            resp = self.resp or await self._prepare()
            if self.write_timeout_s is None or _timeout is None:
                await asyncio.wait_for(resp.write(line), self.write_timeout_s)
            else:  # a deadline without the task wait_for makes around every write
                async with _timeout(self.write_timeout_s):
                    await resp.write(line)
        except (ConnectionResetError, ConnectionError) as exc:
            raise ClientGone(str(exc)) from None
        except asyncio.TimeoutError:
            # a client that does not read: its buffers must not grow, nor its backend work go on
            self.write_timed_out = True
            raise ClientGone(f"the client took no bytes for {self.write_timeout_s} s") from None
        self.started = True
        self._sent(line)

    def _sent(self, line: bytes) -> None:
        """What the client now has: the tokens counted by their events, the stream's end."""
        if b"data: [DONE]" in line[-16:]:
            self.done = True
        n = (
            line.count(b'"text":"')
            - line.count(b'"text":"",')
            + line.count(b'"content":"')
            - line.count(b'"content":""')
        )
        if n > 0:
            now = self._now()
            if self.first_token_at is None:
                self.first_token_at = now
            self.last_token_at = now
            self.tokens += n

    async def write_prefix(self, first: dict, text: str) -> None:
        """Stream a whole answer's text as one token event (a one-token answer the prefill finished)."""
        obj = first.get("object")
        rid, model, created = first.get("id"), first.get("model"), first.get("created")
        if obj == "chat.completion":
            chunks = [{"role": "assistant", "content": ""}, {"content": text}]
            for delta in chunks:
                await self.write(
                    _sse(
                        {
                            "id": rid,
                            "object": "chat.completion.chunk",
                            "created": created,
                            "model": model,
                            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
                        }
                    )
                )
        else:
            await self.write(
                _sse(
                    {
                        "id": rid,
                        "object": "text_completion",
                        "created": created,
                        "model": model,
                        "choices": [
                            {"index": 0, "text": text, "logprobs": None, "finish_reason": None, "stop_reason": None}
                        ],
                    }
                )
            )

    async def whole(self, data: bytes, status: int) -> web.StreamResponse:
        if self.capture:
            self.captured, self.captured_status = data, status
            return web.Response(status=status)
        if self.started:
            return await self.fail(APIError(502, "backend answered out of band", None, "backend_failed"))
        self.ok = status < 400
        return web.Response(body=data, status=status, content_type="application/json")

    async def from_complete(self, first: dict, body: dict) -> web.StreamResponse:
        first.pop("kv_transfer_params", None)
        if not self.stream:
            return web.json_response(first)
        await self.write_prefix(first, _text_of(first))
        finish = first["choices"][0].get("finish_reason")
        if first.get("object") == "chat.completion":
            last = {
                "id": first["id"],
                "object": "chat.completion.chunk",
                "created": first["created"],
                "model": first["model"],
                "choices": [
                    {
                        "index": 0,
                        "delta": {},
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": first["choices"][0].get("stop_reason"),
                    }
                ],
            }
        else:
            last = {
                "id": first["id"],
                "object": "text_completion",
                "created": first["created"],
                "model": first["model"],
                "choices": [
                    {
                        "index": 0,
                        "text": "",
                        "logprobs": None,
                        "finish_reason": finish,
                        "stop_reason": first["choices"][0].get("stop_reason"),
                    }
                ],
            }
        await self.write(_sse(last))
        if (body.get("stream_options") or {}).get("include_usage"):
            await self.write(
                _sse(
                    {
                        **{k: last[k] for k in ("id", "object", "created", "model")},
                        "choices": [],
                        "usage": first.get("usage"),
                    }
                )
            )
        await self.write(b"data: [DONE]\n\n")
        return await self.finish()

    async def finish(self) -> web.StreamResponse:
        self.ok = True
        resp = await self._prepare()
        try:
            await resp.write_eof()
        except ConnectionResetError:  # every byte went out; a client that stopped reading (a probe) just left
            pass
        return resp

    async def fail(self, err: APIError) -> web.StreamResponse:
        if self.capture:
            self.captured, self.captured_status = json.dumps(err.body()).encode(), err.status
            return web.Response(status=err.status)
        if not self.started:
            return _error(err)
        resp = await self._prepare()
        await resp.write(_sse(err.body()))
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        self.done = True
        return resp


def _message_of(data: bytes) -> str:
    try:
        return json.loads(data)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return data[:200].decode(errors="replace")


def _sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _seconds(value: object) -> float:
    """A path-overhead figure in seconds, in [0, 1): anything else is refused."""
    seconds = float(value)  # type: ignore[arg-type]
    if not 0.0 <= seconds < 1.0:
        raise ValueError("seconds must be in [0, 1)")
    return seconds


def _text_of(resp: dict) -> str:
    choice = resp["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice.get("text", "")


def _error(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


ROUTER = web.AppKey("router", Router)


def create_router_app(settings: RouterSettings) -> web.Application:
    app = web.Application(middlewares=[json_errors], client_max_size=64 * 1024 * 1024)
    router = Router(settings)
    app[ROUTER] = router

    async def lifecycle(app: web.Application):
        await router.start()
        yield
        await router.stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_post("/v1/completions", router.generate)
    app.router.add_post("/v1/chat/completions", router.generate)
    app.router.add_get("/v1/models", router.models)
    app.router.add_post("/v1/retrieve", router.pipelines.retrieve)
    app.router.add_post("/v1/pipelines", router.pipelines.run)
    add_probe_routes(app, settings.model_name, settings.max_model_len, settings.vocab_size)
    app.router.add_get("/health", router.health)
    app.router.add_get("/ready", router.ready)
    app.router.add_get("/metrics", router.metrics)
    app.router.add_post("/admin/path-overhead", router.set_path_overhead)
    app.router.add_post("/admin/fault", router.set_fault)
    app.router.add_get("/admin/fault", router.set_fault)
    return app
