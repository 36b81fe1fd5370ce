"""An asyncio open-loop client: sends a request plan to an OpenAI endpoint at the planned
times and measures every request from the stream (TTFT, each inter-token gap, E2E).

It fills the same ``RequestRecord``s the simulator does, so a run and a simulation of
the same plan compare field by field. Prompts are token-id lists of the planned length
(exact lengths, no shared prefixes unless the plan has segments); ``ignore_eos`` fixes
the output length.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections import deque

import numpy as np
from aiohttp import ClientSession, ClientTimeout, TCPConnector, TraceConfig

from emulator.errors import openai_error_code
from emulator.results import LOST, RequestRecord
from emulator.rng import PartitionedRNG
from emulator.serve.app import ARRIVAL_HEADER, FIRST_DUE_COMMENT, FIRST_DUE_HEADER, PATH_OVERHEAD_HEADER
from emulator.serve.internal import internal_headers
from emulator.spec import PipelineSpec
from emulator.workload.clients import ClientBehaviour, ClosedLoopClients
from emulator.workload.content import segment_token_ids
from emulator.workload.plan import PlannedRequest, RequestPlan


def prompt_ids(p: PlannedRequest, vocab: int) -> list[int]:
    """Deterministic token ids of the planned length; segments (shared content) give shared ids."""
    rng = np.random.default_rng(p.index + 1)
    if not p.segments:
        return rng.integers(0, vocab, p.input_len).tolist()
    return segment_token_ids(p.segments, vocab, p.input_len)


def request_body(model: str, p: PlannedRequest, vocab: int) -> bytes:
    """Encoded ahead of the run, so sending costs nothing at the planned time. A pipeline request goes
    to the router's ``/v1/pipelines`` (``path_of``), which builds each stage's prompt itself."""
    if p.pipeline is not None:
        body = {
            "model": model,
            "pipeline": p.pipeline.model_dump(by_alias=True, exclude={"weight"}),
            "question_tokens": p.input_len,
            "max_tokens": p.output_len,
            "index": p.index,
        }
        if p.segments:
            body["segments"] = [list(s) for s in p.segments]
        return json.dumps(body).encode()
    return json.dumps(
        {
            "model": model,
            "prompt": prompt_ids(p, vocab),
            "max_tokens": p.output_len,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()


class ClusterLink:
    """What `infemu run`'s own client tells its cluster's router; it holds the cluster token, so the
    router trusts it (``emulator.serve.internal``). With every request: when it was due at the front
    door (monotonic seconds, the clock every process on this host shares), so the client -> router
    hop and the client's own lateness are the emulation's, not the model's; and how long the way
    back from a worker's release of a first token to this client takes under the run's load,
    measured on the first tokens read so far (the worker reports each release time at the end of
    the stream), so the workers let the engine see each request that much earlier
    (``emulator.serve.api_path``). Another tool's client sends neither: the router then counts from
    its own receipt and the launcher's idle round trip."""

    MIN_SAMPLES = 8  # below this the launcher's idle measurement stands
    WINDOW = 64  # the estimate follows the load: the last 64 first tokens

    def __init__(self, token: str) -> None:
        self.token = token
        self.samples: deque[float] = deque(maxlen=self.WINDOW)
        self.estimate_s: float | None = None

    def headers(self, due: float) -> dict[str, str]:
        out = {**internal_headers(self.token), ARRIVAL_HEADER: repr(due), FIRST_DUE_HEADER: "1"}
        if self.estimate_s is not None:
            out[PATH_OVERHEAD_HEADER] = repr(self.estimate_s)
        return out

    def observe(self, first_read: float, released: float) -> None:
        """One first token: read at ``first_read``, released by the model at ``released``."""
        back = first_read - released
        if not 0.0 <= back < 1.0:  # another host's clock, or a stall that says nothing about the path
            return
        self.samples.append(back)
        if len(self.samples) >= self.MIN_SAMPLES:
            self.estimate_s = statistics.median(self.samples)


def path_of(pipeline: PipelineSpec | None) -> str:
    return "/v1/pipelines" if pipeline is not None else "/v1/completions"


async def send_one(
    session: ClientSession,
    url: str,
    p: PlannedRequest,
    body: bytes,
    t_origin: float,
    deadline_s: float | None = None,
    path: str = "/v1/completions",
    link: ClusterLink | None = None,
    due: float = 0.0,
) -> RequestRecord:
    """One request, measured from its stream. ``deadline_s`` (wall): a request with no answer by then
    is abandoned and recorded as ``lost`` — the router's own deadline should always answer first."""
    rec = RequestRecord(f"req-{p.index}", 0.0, p.input_len)
    start = time.perf_counter()
    rec.arrival_s = start - t_origin
    times: list[float] = []
    try:
        await asyncio.wait_for(_exchange(session, url + path, body, t_origin, rec, times, link, due), deadline_s)
    except asyncio.TimeoutError:
        rec.error = f"lost: no answer within the client's deadline ({deadline_s:.0f} s)"
        rec.error_code = LOST
    except Exception as exc:  # the request ends with an explicit error, whatever broke
        rec.error = f"{type(exc).__name__}: {exc}"
        rec.error_code = "connection"
    rec.finish_s = times[-1] if times else time.perf_counter() - t_origin
    if times:
        rec.first_token_s = times[0]
        if len(times) > 1:
            rec.itl_max_ms = float(np.max(np.diff(times))) * 1e3
    rec.ok = rec.error is None and bool(times)
    if not rec.ok and rec.error_code is None:
        rec.error_code = "empty_stream" if rec.error is None else "other"
    if rec.ok and rec.output_tokens == 0:
        rec.output_tokens = len(times)
    return rec


async def _exchange(
    session: ClientSession,
    url: str,
    body: bytes,
    t_origin: float,
    rec: RequestRecord,
    times: list[float],
    link: ClusterLink | None = None,
    due: float = 0.0,
) -> None:
    headers = {"Content-Type": "application/json", **(link.headers(due) if link is not None else {})}
    pool: dict[str, float] = {}
    async with session.post(url, data=body, headers=headers, trace_request_ctx=pool) as resp:
        if pool.get("waited"):
            rec.client_wait_ms = pool["waited"] * 1e3
        if resp.status != 200:
            text = await resp.text()
            rec.error = f"HTTP {resp.status}: {text[:300]}"
            rec.error_code = openai_error_code(text, f"http_{resp.status}")
            return
        tail = b""
        done = False
        async for block in resp.content.iter_any():  # whole reads: every token in one read arrived together
            now = time.perf_counter() - t_origin
            data = tail + block
            events = data.split(b"\n\n")
            tail = events.pop()
            for ev in events:
                if not ev.startswith(b"data: "):
                    if link is not None and times and ev.startswith(FIRST_DUE_COMMENT):
                        link.observe(t_origin + times[0], float(ev[len(FIRST_DUE_COMMENT) :]))
                    continue
                if b'"text":"' in ev and b'"text":"",' not in ev:  # a token chunk: no JSON parse needed
                    times.append(now)
                elif ev == b"data: [DONE]":
                    done = True
                else:
                    obj = json.loads(ev[6:])
                    if "error" in obj:
                        rec.error = obj["error"].get("message", "error event")
                        rec.error_code = openai_error_code(ev[6:], "stream_error")
                    elif obj.get("usage"):
                        rec.output_tokens = obj["usage"]["completion_tokens"]
                    elif "infemu_pipeline" in obj:  # the router's account of a pipeline's stages
                        pipe = obj["infemu_pipeline"]
                        rec.pipeline, rec.stages, rec.breakdown_ms = pipe["type"], pipe["stages"], pipe["breakdown_ms"]
        if not done and rec.error is None:  # a stream must end with [DONE]: anything else is an error
            rec.error = "the stream ended without [DONE]"
            rec.error_code = "truncated"


# The open-loop client's connection limit where the spec sets none (workload.client.maxConnections)
OPEN_LOOP_CONNECTIONS = 1000


def pool_wait_trace() -> TraceConfig:
    """aiohttp's connection-queue hooks: how long a request waited for a free connection of the pool
    (``trace_request_ctx`` is a dict per request), so a report can tell that wait from the server's."""

    async def queued(_session, ctx, _params) -> None:
        ctx.trace_request_ctx["queued"] = time.perf_counter()

    async def dequeued(_session, ctx, _params) -> None:
        d = ctx.trace_request_ctx
        d["waited"] = d.get("waited", 0.0) + time.perf_counter() - d.pop("queued", time.perf_counter())

    trace = TraceConfig()
    trace.on_connection_queued_start.append(queued)
    trace.on_connection_queued_end.append(dequeued)
    return trace


def to_emulated_time(rec: RequestRecord, dilation: float) -> None:
    """Wall-clock seconds on a dilated cluster -> the emulated cluster's seconds (divide by D)."""
    for attr in ("arrival_s", "first_token_s", "finish_s"):
        if getattr(rec, attr) is not None:
            setattr(rec, attr, getattr(rec, attr) / dilation)
    if rec.itl_max_ms is not None:
        rec.itl_max_ms /= dilation
    rec.client_wait_ms /= dilation


async def run_closed_loop(
    url: str,
    model: str,
    plan: RequestPlan,
    vocab: int,
    dilation: float = 1.0,
    on_done=None,
    behaviour: ClientBehaviour | None = None,
    seed: int = 0,
    deadline_s: float | None = None,
    on_send=None,
    link: ClusterLink | None = None,
    max_connections: int | None = None,
) -> list[RequestRecord]:
    """``plan.concurrency`` clients as the simulator models them (``emulator.workload.clients``):
    a warm-up phase drained before the measured one, and a random client-side overhead before each
    next send. Warm-up requests are not returned. ``max_connections``: the connection pool's limit
    (None: none); a request that waits for a connection has its clock running, as in the simulator."""
    bodies = {p.index: request_body(model, p, vocab) for p in plan.requests}
    behaviour = behaviour or ClientBehaviour(warmup=plan.warmup)
    clients = ClosedLoopClients(
        plan.concurrency or 1,
        len(plan.requests),
        behaviour,
        PartitionedRNG(seed).for_subsystem("workload.clients"),
    )
    records: list[RequestRecord] = []
    stop_at = None if plan.duration_s is None else time.perf_counter() + plan.duration_s * dilation
    connector = TCPConnector(limit=max_connections or 0)
    async with ClientSession(
        timeout=ClientTimeout(total=None), connector=connector, trace_configs=[pool_wait_trace()]
    ) as session:
        t_origin = time.perf_counter()
        tasks: set[asyncio.Task] = set()
        done = asyncio.Event()
        # Requests launched and not yet finished. Counted here, not read off ``tasks``: a task that
        # has returned stays in ``tasks`` until its done-callback runs, so two requests ending in
        # the same loop iteration would each see the other and neither would end the run.
        pending = [0]

        def launch(sends: list[tuple[float, int]]) -> None:
            for t, index in sends:
                if stop_at is not None and t_origin + t * dilation >= stop_at:
                    continue
                pending[0] += 1
                task = asyncio.ensure_future(one(t, index))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        async def one(t: float, index: int) -> None:
            try:
                delay = t_origin + t * dilation - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                p = plan.requests[index]
                if on_send is not None:
                    on_send()
                due = t_origin + t * dilation
                rec = await send_one(
                    session,
                    url,
                    p,
                    bodies[index],
                    t_origin,
                    deadline_s,
                    path_of(p.pipeline),
                    link,
                    due,
                )
                if not plan.is_warmup(index):
                    records.append(rec)
                    if on_done is not None:
                        on_done(rec)
                # the client model works in emulated seconds; its sends are played D times slower
                ended = (time.perf_counter() - t_origin) / dilation
                launch(clients.on_done(index, ended))
            finally:
                pending[0] -= 1
                if pending[0] == 0:
                    done.set()

        launch(clients.start(0.0))
        if pending[0]:
            await done.wait()
        while tasks:
            await asyncio.gather(*list(tasks))
    for rec in records:
        to_emulated_time(rec, dilation)
    return sorted(records, key=lambda r: int(r.request_id.split("-")[1]))


async def run_plan(
    url: str,
    model: str,
    plan: RequestPlan,
    vocab: int,
    max_connections: int | None = None,
    dilation: float = 1.0,
    on_done=None,
    max_in_flight: int | None = None,
    deadline_s: float | None = None,
    on_send=None,
    link: ClusterLink | None = None,
) -> tuple[list[RequestRecord], np.ndarray]:
    """Send every planned request at its arrival time; returns records and start lags (s).

    With time dilation D the plan is played D times slower and every time in the
    records is divided by D, so they read in the emulated cluster's time. ``max_connections``: the
    connection pool's limit (None: ``OPEN_LOOP_CONNECTIONS``)."""
    connector = TCPConnector(limit=max_connections or OPEN_LOOP_CONNECTIONS)
    bodies = {p.index: request_body(model, p, vocab) for p in plan.requests}
    async with ClientSession(
        timeout=ClientTimeout(total=None), connector=connector, trace_configs=[pool_wait_trace()]
    ) as session:
        t_origin = time.perf_counter() + 0.05
        lags: list[float] = []
        lead = [0.0]  # wake this early: the median lateness of asyncio's timers, learned as we go
        in_flight = [0]

        async def at(p: PlannedRequest) -> RequestRecord:
            delay = t_origin + (p.arrival_s or 0.0) * dilation - time.perf_counter() - lead[0]
            if delay > 0:
                await asyncio.sleep(delay)
            lag = time.perf_counter() - t_origin - (p.arrival_s or 0.0) * dilation
            if max_in_flight is not None and in_flight[0] >= max_in_flight:
                # open loop: a request that cannot start at its time is dropped and counted, never delayed
                rec = RequestRecord(
                    f"req-{p.index}",
                    (p.arrival_s or 0.0) * dilation,
                    p.input_len,
                    error=f"dropped: {max_in_flight} requests already in flight (--max-in-flight)",
                    error_code="dropped",
                    finish_s=lag + (p.arrival_s or 0.0) * dilation,
                )
                if on_done is not None:
                    on_done(rec)
                return rec
            lags.append(lag)
            if len(lags) % 20 == 0:
                lead[0] = min(max(float(np.median(np.asarray(lags[-200:]) + lead[0])), 0.0), 0.002)
            in_flight[0] += 1
            if on_send is not None:
                on_send()
            try:
                due = t_origin + (p.arrival_s or 0.0) * dilation
                rec = await send_one(
                    session,
                    url,
                    p,
                    bodies[p.index],
                    t_origin,
                    deadline_s,
                    path_of(p.pipeline),
                    link,
                    due,
                )
            finally:
                in_flight[0] -= 1
            if on_done is not None:
                on_done(rec)
            return rec

        records = await asyncio.gather(*(at(p) for p in plan.requests))
    # arrival is the planned time, so coordinated omission shows up as TTFT, not hidden
    for rec, p in zip(records, plan.requests, strict=True):
        to_emulated_time(rec, dilation)
        if p.arrival_s is not None:
            rec.arrival_s = p.arrival_s
    return list(records), np.asarray(lags) / dilation
