"""The router's orchestrator for multi-stage requests, and its front door to the retrievers.

``POST /v1/retrieve`` is proxied to the least busy ``rag`` instance (the body is checked there).
``POST /v1/pipelines`` runs one pipeline request: the same stage generator the simulator drives
(``workload/pipelines.py``) yields a retrieval (sent to a retriever), a generation (sent through
this router's own ``/v1/completions`` over loopback, so routing, retries, admission and the SLO
counters apply to each stage exactly as to any request) or a tool call's think time. The final
answer streams to the client as completion chunks (a reasoning stage's hidden tokens are not
relayed), followed by one ``{"infemu_pipeline": ...}`` event with every stage's timing and the
end-to-end latency split as the simulator splits it — retrieval, think, api (the modelled API intake),
kv_fetch, queue, prefill, reasoning, network (the P/D KV pull), decode — in emulated milliseconds
(wall / time dilation): the workers report their share as SSE comments the router asks them for
(``X-Infemu-Timing``, internal only), the router measures the rest.

The body names the pipeline (``pipeline``: the spec's ``PipelineSpec`` fields), the question's
length (``question_tokens``), the answer's (``max_tokens``), a request ``index`` (it keys the
request's own content and its queries, so a run and a simulation of the same plan retrieve the same
documents) and, for a trace replay, the prompt's ``segments``. Every field is bounded; the loopback
target is this server's own socket, never anything a client names.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

from aiohttp import ClientError, ClientSession, web
from prometheus_client import Counter, Histogram
from pydantic import ValidationError

from emulator.rag.corpus import Document
from emulator.serve.app import TIMING_HEADER
from emulator.serve.internal import internal_headers
from emulator.serve.protocol import APIError, read_json_object
from emulator.spec import MAX_TOKENS, PipelineSpec
from emulator.workload.content import segment_token_ids
from emulator.workload.pipelines import Generate, Retrieve, Think, pipeline_stages

MAX_SEGMENTS = 4096
MAX_INDEX = 1 << 40
_E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0)


class PipelineRunner:
    def __init__(self, router, retrievers: list[tuple[str, str]], registry) -> None:
        self.router = router
        self.settings = router.settings
        self.retrievers = retrievers
        self.busy = {name: 0 for name, _ in retrievers}
        self.dilation = self.settings.dilation
        self.active = 0  # pipelines running now
        self.requests = Counter(
            "infemu_pipeline_requests",
            "Pipeline requests by type and outcome.",
            ["pipeline", "outcome"],
            registry=registry,
        )
        self.e2e = Histogram(
            "infemu_pipeline_e2e_seconds",
            "End-to-end latency of pipeline requests (emulated seconds).",
            ["pipeline"],
            buckets=_E2E_BUCKETS,
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "infemu_pipeline_stage_seconds",
            "Time per pipeline stage kind (emulated seconds): retrieval, think, prefill, reasoning, decode.",
            ["pipeline", "stage"],
            buckets=_E2E_BUCKETS,
            registry=registry,
        )
        self.slo = Counter(
            "infemu_pipeline_slo_requests",
            "Pipeline requests by whether the final answer met TTFT and TPOT and the pipeline met slo.e2eMs.",
            ["pipeline", "met"],
            registry=registry,
        )

    # ---- retrieval ----------------------------------------------------------------------------------
    def _retriever(self) -> tuple[str, str]:
        if not self.retrievers:
            raise APIError(503, "this cluster has no retriever (a pool with role rag)", None, "no_backend")
        return min(self.retrievers, key=lambda r: self.busy[r[0]])

    async def _post_retrieve(self, session: ClientSession, body: dict) -> tuple[int, dict]:
        name, url = self._retriever()
        self.busy[name] += 1
        try:
            async with session.post(f"{url}/v1/retrieve", json=body) as resp:
                return resp.status, await resp.json(content_type=None)
        except (OSError, ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise APIError(502, f"retriever {name} failed: {exc}", None, "backend_failed") from None
        finally:
            self.busy[name] -= 1

    async def retrieve(self, request: web.Request) -> web.Response:
        try:
            body = await read_json_object(request)
            status, answer = await self._post_retrieve(self.router.session, body)
        except APIError as exc:
            return web.json_response(exc.body(), status=exc.status)
        return web.json_response(answer, status=status)

    # ---- pipelines ----------------------------------------------------------------------------------
    def _parse(self, body: dict) -> tuple[PipelineSpec, int, int, int, tuple]:
        if body.get("model") != self.settings.model_name:
            raise APIError(404, f"The model `{body.get('model')}` does not exist.", "model", "model_not_found")
        raw = body.get("pipeline")
        if not isinstance(raw, dict):
            raise APIError(400, "pipeline: an object with a type (rag, multihop, reasoning, agentic)", "pipeline")
        try:
            spec = PipelineSpec.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise APIError(400, f"pipeline.{where}: {first['msg']}", "pipeline") from None
        ints = {}
        for key, lo, hi in (("question_tokens", 1, MAX_TOKENS), ("max_tokens", 1, MAX_TOKENS), ("index", 0, MAX_INDEX)):
            v = body.get(key, 0 if key == "index" else None)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise APIError(400, f"{key}: an integer from {lo} to {hi}", key)
            ints[key] = v
        segments = body.get("segments") or ()
        if segments:
            ok = isinstance(segments, list) and len(segments) <= MAX_SEGMENTS
            ok = ok and all(
                isinstance(s, list) and len(s) == 2 and all(isinstance(x, int) and not isinstance(x, bool) for x in s)
                and abs(s[0]) < 2**62 and 0 < s[1] <= MAX_TOKENS
                for s in segments
            )  # fmt: skip
            if not ok or sum(s[1] for s in segments) > self.settings.max_model_len:
                raise APIError(
                    400, f"segments: at most {MAX_SEGMENTS} [content id, tokens] pairs within the context", "segments"
                )
            segments = tuple((int(a), int(b)) for a, b in segments)
        return spec, ints["question_tokens"], ints["max_tokens"], ints["index"], segments

    async def run(self, request: web.Request) -> web.StreamResponse:
        """One pipeline, within the router's limits: at most ``maxInFlight`` pipelines at once (beyond, the
        router's 429/503 with Retry-After) and the request deadline (``timeouts.requestMs``) for all stages."""
        try:
            args = self._parse(await read_json_object(request))
        except APIError as exc:
            return web.json_response(exc.body(), status=exc.status)
        res = self.router.res
        if self.active >= res.max_in_flight:
            self.router.rejections.labels("router_full").inc()
            err = APIError(res.reject_status, f"the router runs {self.active} pipelines, its limit", None, "overloaded")
            return web.json_response(
                err.body(), status=res.reject_status, headers={"Retry-After": str(res.retry_after_s)}
            )
        self.active += 1
        streaming: list[web.StreamResponse] = []  # the final answer's stream, once it has begun
        try:
            async with asyncio.timeout(res.request_s):
                return await self._run(request, streaming, *args)
        except TimeoutError:
            self.requests.labels(args[0].type, "deadline_exceeded").inc()
            err = APIError(504, f"the pipeline's deadline ({res.request_s:.1f} s) passed", None, "deadline_exceeded")
            if streaming and streaming[0].prepared:  # after the first byte: an explicit error event ends it
                with contextlib.suppress(ConnectionResetError):
                    event = b"data: " + json.dumps(err.body()).encode() + b"\n\n"
                    await streaming[0].write(event + b"data: [DONE]\n\n")
                return streaming[0]
            return web.json_response(err.body(), status=504)
        finally:
            self.active -= 1

    async def _run(self, request, streaming: list, spec, question, answer, index, segments) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        start = loop.time()
        own = _own_url(request)
        gen = pipeline_stages(spec, index, question, answer, segments)
        stages: list[dict] = []
        breakdown: dict[str, float] = {}
        resp: web.StreamResponse | None = None
        result = None
        first_visible = last = None
        visible = 0
        try:
            stage = next(gen)
            while True:
                t0 = loop.time()
                if isinstance(stage, Retrieve):
                    result = await self._retrieve_stage(stage)
                    self._note(stages, breakdown, spec.type, "retrieval", t0, loop.time(), start, hop=stage.hop)
                elif isinstance(stage, Think):
                    await asyncio.sleep(stage.seconds * self.dilation)
                    result = None
                    self._note(stages, breakdown, spec.type, "think", t0, loop.time(), start, hop=stage.hop)
                else:
                    if stage.final:
                        resp = web.StreamResponse(
                            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                        )
                        streaming.append(resp)
                    account: dict = {}
                    times = await self._generate(own, stage, request if stage.final else None, resp, account)
                    first = times[0] if times else loop.time()
                    shown = times[stage.hidden_tokens] if len(times) > stage.hidden_tokens else loop.time()
                    end = loop.time()
                    for part, ms in self._split(account, first - t0, shown - first, end - shown).items():
                        breakdown[part] = breakdown.get(part, 0.0) + ms
                        self.stage_seconds.labels(spec.type, part).observe(ms / 1e3)
                    stages.append(
                        {
                            "stage": "generate",
                            "hop": stage.hop,
                            "start_ms": self._ms(t0 - start),
                            "ms": self._ms(end - t0),
                            "prompt_tokens": stage.prompt_tokens,
                            "output_tokens": len(times),
                        }
                    )
                    if stage.final:
                        first_visible, last, visible = (
                            shown,
                            (times[-1] if times else end),
                            len(times) - stage.hidden_tokens,
                        )
                    result = None
                stage = gen.send(result)
        except StopIteration:
            pass
        except APIError as exc:
            self.requests.labels(spec.type, "failed").inc()
            if resp is not None and resp.prepared:
                with contextlib.suppress(ConnectionResetError):  # the client may be what went away
                    await resp.write(b"data: " + json.dumps(exc.body()).encode() + b"\n\n" + b"data: [DONE]\n\n")
                return resp
            return web.json_response(exc.body(), status=exc.status)
        end = loop.time()
        self.requests.labels(spec.type, "ok").inc()
        self.e2e.labels(spec.type).observe((end - start) / self.dilation)
        self._account(spec.type, start, first_visible, last, visible, end)
        assert resp is not None
        summary = {"type": spec.type, "e2e_ms": self._ms(end - start), "stages": stages, "breakdown_ms": breakdown}
        with contextlib.suppress(ConnectionResetError):  # a client that left after its last token
            await resp.write(b"data: " + json.dumps({"infemu_pipeline": summary}).encode() + b"\n\ndata: [DONE]\n\n")
            await resp.write_eof()
        return resp

    def _split(self, account: dict, to_first: float, reasoning: float, after: float) -> dict[str, float]:
        """A generation's time (wall seconds: to its first token, hidden reasoning, the rest) in the
        simulator's parts, emulated ms: the workers' own account gives the API intake, KV fetch and queue
        (the prefill leg's, in P/D), the P/D hand-off and KV pull, and the decode's work before the first
        token (in P/D the client's first token comes from the decode); prefill and decode are what
        remains of each span, so the parts add up to the stage."""
        front = account.get("infemu-timing-prefill") or account.get("infemu-timing") or {}
        known = {k: front.get(f"{k}_ms", 0.0) for k in ("api", "kv_fetch", "queue")}
        decode = (account.get("infemu-timing") or {}) if "infemu-timing-prefill" in account else {}
        first_ms, after_ms = self._ms(to_first), self._ms(after)
        known["network"] = decode.get("kv_pull_ms", 0.0)
        head = decode.get("head_ms", 0.0)
        known = {k: min(v, first_ms) for k, v in known.items()}
        scale = min(1.0, first_ms / sum(known.values())) if sum(known.values()) else 1.0  # never past the span
        parts = {k: v * scale for k, v in known.items()}
        head = min(head, first_ms - sum(parts.values()))
        parts["prefill"] = first_ms - sum(parts.values()) - head
        parts["reasoning"] = self._ms(reasoning)
        parts["decode"] = after_ms + head
        return {k: v for k, v in parts.items() if v > 0 or k in ("prefill", "decode")}

    def _ms(self, wall_s: float) -> float:
        return wall_s / self.dilation * 1e3

    def _note(self, stages, breakdown, kind, stage, t0, t1, start, record=True, **extra) -> None:
        ms = self._ms(max(t1 - t0, 0.0))
        breakdown[stage] = breakdown.get(stage, 0.0) + ms
        self.stage_seconds.labels(kind, stage).observe(ms / 1e3)
        if record:
            stages.append({"stage": stage, "start_ms": self._ms(t0 - start), "ms": ms, **extra})

    def _account(self, kind, start, first, last, visible, end) -> None:
        s = self.settings
        met = first is not None and first - start <= s.slo_ttft_s
        if met and visible > 1:
            met = (last - first) / (visible - 1) <= s.slo_tpot_s
        if met and s.slo_e2e_s is not None:
            met = end - start <= s.slo_e2e_s
        self.slo.labels(kind, "true" if met else "false").inc()

    async def _retrieve_stage(self, stage: Retrieve) -> list[Document]:
        body: dict = {"query": stage.query, "query_tokens": stage.query_tokens, "top_k": stage.top_k}
        if stage.among:
            body["filter"] = {"ids": list(stage.among[:64])}
        status, answer = await self._post_retrieve(self.router.session, body)
        if status != 200:
            err = answer.get("error", {}) if isinstance(answer, dict) else {}
            raise APIError(
                status, f"retrieval failed: {err.get('message', answer)}", None, err.get("code", "retrieval_failed")
            )
        return [Document(int(d["id"]), int(d["tokens"]), float(d.get("score", 0.0))) for d in answer["data"]]

    async def _generate(self, own: str, stage: Generate, request, resp, account: dict) -> list[float]:
        """One generation through this router; returns each token's arrival time. The final stage's
        visible tokens are relayed to ``resp`` as they come. ``account`` receives the workers' own timing
        (SSE comments the router asks them for: the API intake, KV fetch, queue, P/D KV pull)."""
        body = {
            "model": self.settings.model_name,
            "prompt": segment_token_ids(stage.segments, self.settings.vocab_size),
            "max_tokens": stage.max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
        times: list[float] = []
        try:
            return await self._stream_stage(own, body, stage, request, resp, times, account)
        except (OSError, ClientError, ValueError) as exc:  # the loopback failed or its stream broke
            raise APIError(502, f"generation failed: {exc}", None, "backend_failed") from None

    async def _stream_stage(
        self, own: str, body: dict, stage: Generate, request, resp, times: list, account: dict
    ) -> list[float]:
        loop = asyncio.get_running_loop()
        headers = {**internal_headers(self.router.token), TIMING_HEADER: "1"}
        async with self.router.session.post(f"{own}/v1/completions", json=body, headers=headers) as r:
            if r.status != 200:
                text = await r.text()
                try:
                    err = json.loads(text).get("error", {})
                except ValueError:
                    err = {}
                raise APIError(
                    r.status,
                    f"generation failed: {err.get('message', text[:200])}",
                    None,
                    err.get("code", "generation_failed"),
                )
            tail = b""
            done = False
            async for block in r.content.iter_any():
                now = loop.time()
                events = (tail + block).split(b"\n\n")
                tail = events.pop()
                for ev in events:
                    done = done or ev == b"data: [DONE]"
                    if ev.startswith(b": infemu-timing"):  # ": infemu-timing-prefill {..}" or ": infemu-timing {..}"
                        key, _, payload = ev[2:].partition(b" ")
                        account[key.decode()] = json.loads(payload)
                        continue
                    if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                        continue
                    if b'"error"' in ev and b'"choices"' not in ev:
                        obj = json.loads(ev[6:]).get("error", {})
                        raise APIError(
                            502,
                            f"generation failed: {obj.get('message', 'error event')}",
                            None,
                            obj.get("code", "generation_failed"),
                        )
                    if b'"text":"' in ev and b'"text":"",' not in ev:
                        times.append(now)
                        if resp is not None and len(times) > stage.hidden_tokens:
                            if not resp.prepared:
                                await resp.prepare(request)
                            await resp.write(ev + b"\n\n")
        if not done:
            raise APIError(502, "generation failed: the stream ended without [DONE]", None, "truncated")
        if resp is not None and not resp.prepared:
            await resp.prepare(request)
        return times


def _own_url(request: web.Request) -> str:
    """This server as the client reached it: the accepted socket's own address (never a client's Host)."""
    host, port = request.transport.get_extra_info("sockname")[:2] if request.transport else ("127.0.0.1", 0)
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
