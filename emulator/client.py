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
import time

import numpy as np
from aiohttp import ClientSession, ClientTimeout, TCPConnector

from emulator.results import RequestRecord
from emulator.workload.plan import PlannedRequest, RequestPlan


def prompt_ids(p: PlannedRequest, vocab: int) -> list[int]:
    """Deterministic token ids of the planned length; segments (shared content) give shared ids."""
    rng = np.random.default_rng(p.index + 1)
    if not p.segments:
        return rng.integers(0, vocab, p.input_len).tolist()
    ids: list[int] = []
    for seg_id, n in p.segments:
        seg_rng = np.random.default_rng(abs(seg_id) + (1 << 40 if seg_id < 0 else 0))
        ids.extend(seg_rng.integers(0, vocab, n).tolist())
    return ids[: p.input_len]


def request_body(model: str, p: PlannedRequest, vocab: int) -> bytes:
    """Encoded ahead of the run, so sending costs nothing at the planned time."""
    return json.dumps({"model": model, "prompt": prompt_ids(p, vocab), "max_tokens": p.output_len,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()


async def send_one(session: ClientSession, url: str, p: PlannedRequest, body: bytes, t_origin: float) -> RequestRecord:
    rec = RequestRecord(f"req-{p.index}", 0.0, p.input_len)
    start = time.perf_counter()
    rec.arrival_s = start - t_origin
    times: list[float] = []
    try:
        async with session.post(f"{url}/v1/completions", data=body,
                                headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                rec.finish_s = time.perf_counter() - t_origin
                return rec
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: "):
                    continue
                if line == b"data: [DONE]":
                    break
                now = time.perf_counter() - t_origin
                if b'"text":"' in line and b'"text":"",' not in line:  # a token chunk: no JSON parse needed
                    times.append(now)
                    continue
                obj = json.loads(line[6:])
                if "error" in obj:
                    rec.error = obj["error"].get("message", "error event")
                elif obj.get("usage"):
                    rec.output_tokens = obj["usage"]["completion_tokens"]
    except Exception as exc:  # the request ends with an explicit error, whatever broke
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.finish_s = (times[-1] if times else time.perf_counter() - t_origin)
    if times:
        rec.first_token_s = times[0]
        if len(times) > 1:
            rec.itl_max_ms = float(np.max(np.diff(times))) * 1e3
    rec.ok = rec.error is None and bool(times)
    if rec.ok and rec.output_tokens == 0:
        rec.output_tokens = len(times)
    return rec


async def run_plan(url: str, model: str, plan: RequestPlan, vocab: int, max_connections: int = 1000
                   ) -> tuple[list[RequestRecord], np.ndarray]:
    """Send every planned request at its arrival time; returns records and start lags (s)."""
    connector = TCPConnector(limit=max_connections)
    bodies = {p.index: request_body(model, p, vocab) for p in plan.requests}
    async with ClientSession(timeout=ClientTimeout(total=None), connector=connector) as session:
        t_origin = time.perf_counter() + 0.05
        lags: list[float] = []

        async def at(p: PlannedRequest) -> RequestRecord:
            delay = t_origin + (p.arrival_s or 0.0) - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            lags.append(time.perf_counter() - t_origin - (p.arrival_s or 0.0))
            return await send_one(session, url, p, bodies[p.index], t_origin)

        records = await asyncio.gather(*(at(p) for p in plan.requests))
    # arrival is the planned time, so coordinated omission shows up as TTFT, not hidden
    for rec, p in zip(records, plan.requests, strict=True):
        rec.arrival_s = p.arrival_s or rec.arrival_s
    return list(records), np.asarray(lags)
