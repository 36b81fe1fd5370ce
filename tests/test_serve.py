"""The worker service in-process: OpenAI shapes, errors, metrics families and buckets."""

from __future__ import annotations

import asyncio
import json
import os

import pytest
from aiohttp.test_utils import TestClient, TestServer
from conftest import ROOT, example, metric_samples, until_aborted
from prometheus_client.parser import text_string_to_metric_families

from emulator.serve.app import WorkerSettings, create_app
from emulator.serve.metrics import REQUEST_LATENCY_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS, build_1_2_5_buckets
from emulator.spec import load_clusters

MODEL = "llama-3.1-8b"


@pytest.fixture
async def client():
    cluster = load_clusters(example("quickstart.yaml"))[0]
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as c:
        yield c


async def sse_events(resp) -> list[dict | str]:
    out = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if line.startswith("data: "):
            out.append("[DONE]" if line == "data: [DONE]" else json.loads(line[6:]))
    return out


async def test_chat_stream_shape_and_usage(client):
    resp = await client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi there"}],
            "max_tokens": 7,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(tokens) == 7
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7


async def test_completion_with_token_ids_is_deterministic(client):
    body = {"model": MODEL, "prompt": [5, 6, 7, 8, 9], "max_tokens": 6, "ignore_eos": True}
    a = await (await client.post("/v1/completions", json=body)).json()
    b = await (await client.post("/v1/completions", json=body)).json()
    assert a["usage"] == {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}
    assert a["choices"][0]["text"] == b["choices"][0]["text"] and a["choices"][0]["text"]
    assert a["object"] == "text_completion" and a["choices"][0]["finish_reason"] == "length"


async def test_synthetic_eos_stops_before_max_tokens_without_ignore_eos(client):
    async def ask(prompt: str, **kw) -> dict:
        return await (await client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, **kw})).json()

    answers = await asyncio.gather(
        *(ask(f"question number {i}", max_tokens=300) for i in range(8)), ask("x", max_tokens=60, min_tokens=60)
    )
    lengths = {(r["usage"]["completion_tokens"], r["choices"][0]["finish_reason"]) for r in answers[:-1]}
    assert any(reason == "stop" for _, reason in lengths)  # a synthetic end of sequence before max_tokens
    assert len({n for n, _ in lengths}) > 1
    assert answers[-1]["usage"]["completion_tokens"] == 60  # min_tokens holds the EOS back


async def test_models_health_ready(client):
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == MODEL
    assert (await client.get("/health")).status == 200
    assert (await client.get("/ready")).status == 200


@pytest.mark.parametrize(
    "path, body, status, code",
    [
        ("/v1/completions", b"{not json", 400, "invalid_json"),
        ("/v1/completions", {"model": "gpt-x", "prompt": "hi"}, 404, "model_not_found"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -5}, 400, "invalid_value"),
        # what the emulator does not produce is refused, never silently ignored
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logprobs": 3}, 400, "unsupported"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 2},
            400,
            "unsupported",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": "required",
            },
            400,
            "unsupported",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_object"},
            },
            400,
            "unsupported",
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": [1] * 131000, "max_tokens": 500},
            400,
            "context_length_exceeded",
        ),
        ("/v1/chat/completions", {"model": MODEL}, 400, "missing_required_parameter"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 3}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": [1, -4]}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": -5}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_k": -2}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "presence_penalty": 2.5}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": "hot"}, 400, "invalid_type"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "seed": 1.5}, 400, "invalid_type"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "best_of": 3}, 400, "unsupported"),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/"}}]}],
            },
            400,
            "unsupported",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "unsupported"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": 5}, 400, "invalid_type"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": ["x"] * 17}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop": "x" * 257}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": [-1]}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stop_token_ids": "7"}, 400, "invalid_type"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "suffix": "!"}, 400, "unsupported"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_value"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": [["deep"]]}]}]},
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"q": 1}}}]},
                ],
            },
            400,
            "invalid_value",
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "guided_json": {"type": "object"}}, 400, "unsupported"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "guided_choice": ["a", "b"]}, 400, "unsupported"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"999999999": 5}}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"cat": 5}}, 400, "invalid_value"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": "up"}}, 400, "invalid_type"),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": [5]}, 400, "invalid_value"),
    ],
)
async def test_bad_requests_get_openai_errors_never_500(client, path, body, status, code):
    kw = {"data": body} if isinstance(body, bytes) else {"json": body}
    resp = await client.post(path, **kw)
    assert resp.status == status
    err = (await resp.json())["error"]
    assert err["code"] == code and err["message"] and "type" in err and "param" in err


HOSTILE = [
    # (what, path, raw body, extra headers): each once made the worker answer 500 (issue 13)
    ("nested 1,000 deep", "/v1/completions", b'{"model":"m","prompt":' + b"[" * 1000 + b"]" * 1000 + b"}", {}),
    ("a body that is not gzip", "/v1/completions", b'{"model":"m","prompt":"hi"}', {"Content-Encoding": "gzip"}),
    (
        "a 5,000-digit max_tokens",
        "/v1/completions",
        b'{"model":"m","prompt":"hi","max_tokens":' + b"9" * 5000 + b"}",
        {},
    ),
    ("not UTF-8", "/v1/completions", b'{"model":"m","prompt":"\xff\xfe"}', {}),
    ("a JSON array for /admin/link", "/admin/link", b"[]", {}),
]


@pytest.mark.parametrize("what, path, raw, headers", HOSTILE, ids=[h[0] for h in HOSTILE])
async def test_hostile_bodies_are_client_errors_not_server_errors(client, what, path, raw, headers):
    resp = await client.post(path, data=raw, headers={"Content-Type": "application/json", **headers})
    assert 400 <= resp.status < 500, (what, resp.status, await resp.text())
    assert (await resp.json())["error"]["message"]


async def test_odd_but_valid_input_is_served():
    """A lone surrogate in the prompt and a bogus charset are not errors at all (JSON is UTF-8)."""
    cluster = load_clusters(example("quickstart.yaml"))[0]
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as c:
        body = b'{"model":"%s","prompt":"\\ud800 hi","max_tokens":2}' % MODEL.encode()
        resp = await c.post("/v1/completions", data=body, headers={"Content-Type": "application/json; charset=bogus"})
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["usage"]["completion_tokens"] <= 2


async def test_kv_transfer_params_need_the_cluster_token(monkeypatch):
    """A client must not make a worker connect where it likes (issue 13, security)."""
    monkeypatch.setenv("INFEMU_INTERNAL_TOKEN", "s3cret")
    cluster = load_clusters(example("quickstart.yaml"))[0]
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as c:
        kv = {"do_remote_prefill": True, "remote_url": "http://127.0.0.1:9", "remote_request_id": "x"}
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "kv_transfer_params": kv}
        resp = await c.post("/v1/completions", json=body)
        assert resp.status == 403 and (await resp.json())["error"]["param"] == "kv_transfer_params"
        assert (await c.get("/internal/kv/anything")).status == 403
        assert (await c.post("/admin/link", json={"to": "*", "cut": True})).status == 403  # no live faults either
        allowed = await c.post("/admin/link", json={"to": "*", "reset": True}, headers={"X-Infemu-Internal": "s3cret"})
        assert allowed.status == 200
        ok = await c.post("/v1/completions", json={k: v for k, v in body.items() if k != "kv_transfer_params"})
        assert ok.status == 200


async def test_metrics_families_types_and_buckets(client):
    await client.post(
        "/v1/completions", json={"model": MODEL, "prompt": "hello world " * 40, "max_tokens": 5, "ignore_eos": True}
    )
    text = await (await client.get("/metrics")).text()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    expected = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:gpu_cache_usage_perc": "gauge",
        "vllm:cache_config_info": "gauge",
        "vllm:prompt_tokens": "counter",
        "vllm:generation_tokens": "counter",
        "vllm:request_success": "counter",
        "vllm:num_preemptions": "counter",
        "vllm:prefix_cache_queries": "counter",
        "vllm:prefix_cache_hits": "counter",
        "vllm:gpu_prefix_cache_queries": "counter",
        "vllm:gpu_prefix_cache_hits": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:time_per_output_token_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:request_queue_time_seconds": "histogram",
        "vllm:request_prefill_time_seconds": "histogram",
        "vllm:request_decode_time_seconds": "histogram",
        "vllm:request_prompt_tokens": "histogram",
        "vllm:request_generation_tokens": "histogram",
        "vllm:iteration_tokens_total": "histogram",
        # vLLM v1's request-parameter and per-request families (vllm/v1/metrics/loggers.py, commit 005a810b)
        "vllm:request_max_num_generation_tokens": "histogram",
        "vllm:request_params_n": "histogram",
        "vllm:request_params_max_tokens": "histogram",
        "vllm:time_per_prefill_token_request_seconds": "histogram",
        "vllm:request_time_per_output_token_seconds": "histogram",
        "infemu_iteration_timing_error_seconds": "histogram",
        "infemu_kv_transfer_bytes": "counter",
        "infemu_kv_transfer_seconds": "histogram",
        "infemu_link_bytes": "counter",
    }
    for name, kind in expected.items():
        assert name in fams, name
        assert fams[name].type == kind, (name, fams[name].type)
    assert "vllm:prompt_tokens_total" in text and "_created" not in text
    params = {s.name: s.value for s in fams["vllm:request_params_max_tokens"].samples}
    assert params["vllm:request_params_max_tokens_count"] == 1 and params["vllm:request_params_max_tokens_sum"] == 5
    per_request = {s.name: s.value for s in fams["vllm:request_time_per_output_token_seconds"].samples}
    assert per_request["vllm:request_time_per_output_token_seconds_count"] == 1

    def buckets(name):
        return [float(s.labels["le"]) for s in fams[name].samples if s.name.endswith("_bucket")][:-1]

    assert buckets("vllm:time_to_first_token_seconds") == TTFT_BUCKETS  # the quickstart's SLOs are vLLM buckets
    assert buckets("vllm:inter_token_latency_seconds") == TPOT_BUCKETS
    assert buckets("vllm:time_per_output_token_seconds") == TPOT_BUCKETS
    assert buckets("vllm:e2e_request_latency_seconds") == REQUEST_LATENCY_BUCKETS
    assert buckets("vllm:request_prompt_tokens") == build_1_2_5_buckets(131072)
    assert buckets("vllm:iteration_tokens_total") == [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
    info = next(s for s in fams["vllm:cache_config_info"].samples)
    assert info.labels["block_size"] == "16" and int(info.labels["num_gpu_blocks"]) > 1000
    ok = [s for s in fams["vllm:request_success"].samples if s.labels.get("finished_reason") == "length"]
    assert ok[0].value == 1 and all(s.labels["model_name"] == MODEL for s in ok)


def test_1_2_5_buckets():
    assert build_1_2_5_buckets(100) == [1, 2, 5, 10, 20, 50, 100]


def test_an_array_histogram_exposes_what_a_histogram_fed_one_value_at_a_time_does():
    import numpy as np
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from emulator.serve.metrics import ArrayHistogram

    # gaps on the bounds themselves (le is inclusive), between them, beyond the last, and zero
    batches = [TPOT_BUCKETS[:5], [0.0, 0.012, 0.3000001, 99.0, 1e-9], [], [0.05] * 7]
    one, many = CollectorRegistry(), CollectorRegistry()
    hist = Histogram("x:gap_seconds", "Gaps.", ["model_name", "engine"], buckets=TPOT_BUCKETS, registry=one)
    array = ArrayHistogram("x:gap_seconds", "Gaps.", ["model_name", "engine"], ["m", "0"], TPOT_BUCKETS, many)
    for batch in batches:
        for value in batch:
            hist.labels("m", "0").observe(value)
        array.observe_many(np.array(batch, dtype=np.float64))
    assert generate_latest(many).decode() == generate_latest(one).decode()


async def test_probe_endpoints_clients_call():
    """One model by id, /version, /ping, and unknown routes as OpenAI error JSON — on the worker and the router."""
    from emulator.router.proxy import RouterSettings, create_router_app
    from emulator.version import package_version

    cluster = load_clusters(example("quickstart.yaml"))[0]
    router = create_router_app(RouterSettings(MODEL, 8192, "least_loaded", ()))
    for app in (create_app(WorkerSettings(cluster, "agg-0")), router):
        async with TestClient(TestServer(app)) as c:
            one = await (await c.get(f"/v1/models/{MODEL}")).json()
            assert one["id"] == MODEL and one["object"] == "model"
            missing = await c.get("/v1/models/gpt-9")
            assert missing.status == 404 and (await missing.json())["error"]["code"] == "model_not_found"
            assert (await (await c.get("/version")).json()) == {"version": package_version()}
            assert (await c.get("/ping")).status == 200 and (await c.post("/ping")).status == 200
            for method, path, status in (("GET", "/nope", 404), ("GET", "/v1/completions", 405)):
                resp = await c.request(method, path)
                assert resp.status == status and "error" in await resp.json()
            counted = await (await c.post("/tokenize", json={"model": MODEL, "prompt": "tell me about links"})).json()
            assert counted["count"] == len(counted["tokens"]) > 0 and counted["max_model_len"] >= 8192
            text = await (await c.post("/detokenize", json={"model": MODEL, "tokens": counted["tokens"]})).json()
            assert len(text["prompt"].split()) == counted["count"]
            bad = await c.post("/detokenize", json={"tokens": [-1]})
            assert bad.status == 400 and (await bad.json())["error"]["param"] == "tokens"
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as c:  # counted alike
        body = {"model": MODEL, "prompt": "tell me about links", "max_tokens": 2}
        usage = (await (await c.post("/v1/completions", json=body)).json())["usage"]
        assert usage["prompt_tokens"] == counted["count"]


async def test_a_worker_reports_where_a_requests_time_went_only_to_the_cluster(monkeypatch):
    from emulator.serve.app import TIMING_HEADER
    from emulator.serve.internal import INTERNAL_TOKEN_HEADER, TOKEN_ENV

    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    cluster = load_clusters(example("quickstart.yaml"))[0]
    body = {"model": MODEL, "prompt": "hello there " * 40, "max_tokens": 3, "stream": True}
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as c:
        inside = {INTERNAL_TOKEN_HEADER: "s3cret", TIMING_HEADER: "1"}
        text = await (await c.post("/v1/completions", json=body, headers=inside)).text()
        comments = [e for e in text.split("\n\n") if e.startswith(": infemu-timing ")]
        assert len(comments) == 1 and text.endswith("data: [DONE]\n\n")
        account = json.loads(comments[0].split(" ", 2)[2])
        assert set(account) == {"api_ms", "kv_fetch_ms", "queue_ms"} and account["api_ms"] > 0
        outside = await (await c.post("/v1/completions", json=body, headers={TIMING_HEADER: "1"})).text()
        assert ": infemu-timing" not in outside  # a client's header asks for nothing


async def test_metric_families_match_vllms_list():
    """Every vLLM family in tests/data/vllm_metric_families.json (loggers.py @005a810b plus the later
    ones, cited there) is exported with vLLM's type, except the ones listed as not emulated; no
    vllm: family is invented; the process and GC collectors are there as on vLLM's API server."""
    with open(os.path.join(ROOT, "tests", "data", "vllm_metric_families.json")) as fh:
        ref = json.load(fh)
    cluster = load_clusters(example("quickstart.yaml"))[0]
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as client:
        text = await (await client.get("/metrics")).text()
    fams = {f.name: f.type for f in text_string_to_metric_families(text)}
    wanted = {n: t for n, t in ref["families"].items() if n not in ref["not_emulated"]}
    missing = sorted(set(wanted) - set(fams))
    assert not missing, missing
    assert {n: fams[n] for n in wanted} == wanted
    invented = sorted(n for n in fams if n.startswith("vllm:") and n not in ref["families"])
    assert not invented, invented
    assert all(n in fams for n in ref["python_defaults"])


async def test_prompt_tokens_by_source_split_computed_and_cached(client):
    """A repeated prompt is served from the prefix cache: vLLM's by-source counters say so, and
    prompt_tokens_cached equals the cache's hit tokens."""
    body = {"model": MODEL, "prompt": "the same long system prompt " * 60, "max_tokens": 2, "ignore_eos": True}
    for _ in range(2):
        assert (await client.post("/v1/completions", json=body)).status == 200
    fams = {f.name: f for f in text_string_to_metric_families(await (await client.get("/metrics")).text())}
    by_source = {s.labels["source"]: s.value for s in fams["vllm:prompt_tokens_by_source"].samples}
    hits = next(s.value for s in fams["vllm:prefix_cache_hits"].samples)
    computed = next(s.value for s in fams["vllm:prompt_tokens"].samples)
    cached = next(s.value for s in fams["vllm:prompt_tokens_cached"].samples)
    assert hits > 0 and by_source["local_cache_hit"] == hits == cached
    assert by_source["local_compute"] == computed and by_source["external_kv_transfer"] == 0
    reasons = {s.labels["reason"]: s.value for s in fams["vllm:num_requests_waiting_by_reason"].samples}
    assert reasons == {"capacity": 0, "deferred": 0}


def test_token_chunk_frame_is_the_serialised_chunk_byte_for_byte():
    """The hot path's pre-encoded frame must say exactly what serialising the chunk says."""
    from emulator.serve.protocol import json_text, parse_request, stream_chunk, token_chunk_frame

    for kind, body in (
        ("chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}),
        ("completion", {"model": MODEL, "prompt": "hi", "stream": True}),
    ):
        g = parse_request(kind, body, 32_000)
        head, tail = token_chunk_frame(g, "cmpl-7")
        for text in (" token", 'é\n"quoted"', "\x00", ""):
            expected = b"data: " + json.dumps(stream_chunk(g, "cmpl-7", text, None), separators=(",", ":")).encode()
            assert head + json_text(text) + tail == expected + b"\n\n"


async def _raw_backend(answer_post) -> tuple[asyncio.AbstractServer, str]:
    """A backend speaking raw HTTP: a health check gets 200 ``{}``, a POST whatever ``answer_post``
    writes to the connection (which closes after it)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(
            next((ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")), 0)
        )
        if length:
            await reader.readexactly(length)
        if head.startswith(b"POST"):
            await answer_post(writer)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _breaking_backend(status: int) -> tuple[asyncio.AbstractServer, str]:
    """A backend that passes health checks but dies halfway through every answer to a POST: the status
    line and headers arrive, then the connection closes 10 bytes into a 200-byte body."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n".encode())
        writer.write(b'{"error": ')

    return await _raw_backend(answer)


@pytest.mark.parametrize("status", [500, 200])
async def test_a_backend_dying_mid_answer_is_retried_elsewhere_never_a_bare_500(status):
    """The router reads a whole (non-streamed) answer before relaying it; a backend that dies while sending
    it failed before the client saw a byte: the request goes to another backend (it was an unhandled
    connection error, which aiohttp turns into a plain-text HTTP 500)."""
    from emulator.router.proxy import RouterSettings, create_router_app

    server, url = await _breaking_backend(status)
    cluster = load_clusters(example("quickstart.yaml"))[0]
    async with server, TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as good:
        backends = (("broken-0", "aggregated", url), ("agg-0", "aggregated", str(good.make_url("")).rstrip("/")))
        router = create_router_app(RouterSettings(MODEL, 8192, "round_robin", backends))
        async with TestClient(TestServer(router)) as c:
            for _ in range(2):  # round robin: one of the two lands on the broken backend first
                resp = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi there", "max_tokens": 3})
                assert resp.status == 200, await resp.text()
                assert (await resp.json())["usage"]["completion_tokens"] == 3


async def _silent_stream_backend() -> tuple[asyncio.AbstractServer, str]:
    """A backend that answers health checks and, to a POST, sends a stream's headers and then nothing
    (a worker that hangs in a prefill after the headers went out, as vLLM sends them at once)."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(60)

    return await _raw_backend(answer)


async def test_a_stream_with_headers_but_no_first_byte_is_retried_at_the_first_byte_deadline():
    """The first-byte deadline covers a stream until its first body byte, not only its headers: a request
    stuck in a prefill is retried elsewhere after firstByteMs (here 1 s), long before idleMs (30 s)."""
    from emulator.router.proxy import RouterSettings, create_router_app
    from emulator.spec import RouterSpec

    server, url = await _silent_stream_backend()
    cluster = load_clusters(example("quickstart.yaml"))[0]
    resilience = RouterSpec.model_validate({"timeouts": {"firstByteMs": 1000, "idleMs": 30_000}})
    async with server, TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as good:
        backends = (("silent-0", "aggregated", url), ("agg-0", "aggregated", str(good.make_url("")).rstrip("/")))
        router = create_router_app(RouterSettings(MODEL, 8192, "round_robin", backends, resilience=resilience))
        async with TestClient(TestServer(router)) as c:
            loop = asyncio.get_running_loop()
            for _ in range(2):  # round robin: one of the two lands on the silent backend first
                started = loop.time()
                body = {"model": MODEL, "prompt": "hi there", "max_tokens": 3, "stream": True}
                events = await sse_events(await c.post("/v1/completions", json=body))
                assert events[-1] == "[DONE]" and len(events) == 3 + 2
                assert loop.time() - started < 10
            metrics = (await (await c.get("/metrics")).text()).splitlines()
        counted = [ln for ln in metrics if ln.startswith("infemu_router_timeouts_total") and 'stage="first_byte"' in ln]
        assert counted and float(counted[0].split()[-1]) >= 1


async def test_a_router_defect_is_an_explicit_error_never_a_bare_500():
    """Whatever goes wrong inside the router while it serves a request, the client gets an OpenAI error
    (code router_error) and the trace goes to the router's log, not aiohttp's plain-text HTTP 500."""
    from emulator.router.proxy import ROUTER, RouterSettings, create_router_app

    cluster = load_clusters(example("quickstart.yaml"))[0]
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as good:
        backends = (("agg-0", "aggregated", str(good.make_url("")).rstrip("/")),)
        router = create_router_app(RouterSettings(MODEL, 8192, "round_robin", backends))

        async def defect(*args, **kwargs):
            raise KeyError("choices")

        router[ROUTER]._single = defect
        async with TestClient(TestServer(router)) as c:
            resp = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
            assert resp.status == 500
            err = (await resp.json())["error"]
            assert err["code"] == "router_error" and "KeyError" in err["message"], err


async def test_a_request_that_can_never_run_is_the_clients_error_and_a_shutdown_is_the_servers(tmp_path):
    """The engine's reasons to refuse a request carry their status: one it can never run (here a prompt
    over a TensorRT-LLM budget with chunked prefill off) is a 400 the router passes on without retrying
    or blaming the backend; a worker shutting down answers 503, which the router retries elsewhere."""
    from emulator.router.proxy import RouterSettings, create_router_app
    from emulator.serve.app import WORKER

    spec = tmp_path / "c.yaml"
    spec.write_text(
        "apiVersion: infemu.io/v1alpha1\nkind: InferenceCluster\nmetadata: {name: tiny}\n"
        "spec:\n  model: llama-3.1-8b\n  engine: {name: trtllm}\n  pools:\n"
        "    - {name: agg, replicas: 1, maxNumBatchedTokens: 64}\n"
    )
    cluster = load_clusters(str(spec))[0]
    prompt = " ".join(["word"] * 200)
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as worker:
        for stream in (False, True):
            resp = await worker.post(
                "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4, "stream": stream}
            )
            text = await resp.text()
            if not stream:
                assert resp.status == 400, text
            assert "chunked prefill is off" in text and '"BadRequestError"' in text, text
        url = str(worker.make_url("")).rstrip("/")
        router = create_router_app(RouterSettings(MODEL, 8192, "round_robin", (("agg-0", "aggregated", url),)))
        async with TestClient(TestServer(router)) as c:
            resp = await c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 4})
            assert resp.status == 400, await resp.text()
            health = await (await c.get("/admin/fault")).json()
            assert health["agg-0"]["healthy"], health
        await worker.app[WORKER].stop()
        resp = await worker.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert resp.status == 503, await resp.text()


async def test_a_backend_that_cannot_be_connected_in_time_is_retried_elsewhere():
    """aiohttp's connect timeout is a TimeoutError as well as a ClientError: for a non-streamed request
    (no first-byte deadline) the router once took it for that deadline and failed formatting it (seen as
    a bare HTTP 500 in the Kubernetes kill test). It is a backend the request never reached: retried."""
    from aiohttp import ConnectionTimeoutError

    from emulator.router.proxy import ROUTER, RouterSettings, create_router_app

    cluster = load_clusters(example("quickstart.yaml"))[0]
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as good:
        url = str(good.make_url("")).rstrip("/")
        # the same healthy worker under another name: health checks pass, its requests' connects time out
        dead = url.replace("127.0.0.1", "localhost")
        assert dead != url
        backends = (("dead-0", "aggregated", dead), ("agg-0", "aggregated", url))
        router = create_router_app(RouterSettings(MODEL, 8192, "round_robin", backends))
        async with TestClient(TestServer(router)) as c:
            session = router[ROUTER].session
            post = session.post

            async def connect_times_out(url, **kw):
                raise ConnectionTimeoutError(f"Connection timeout to host {url}")

            session.post = lambda url, **kw: connect_times_out(url) if url.startswith(dead) else post(url, **kw)
            for _ in range(2):  # round robin: one of the two lands on the dead backend first
                resp = await c.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
                assert resp.status == 200, await resp.text()


async def _router_over(worker: TestClient):
    from emulator.router.proxy import RouterSettings, create_router_app

    backends = (("agg-0", "aggregated", str(worker.make_url("")).rstrip("/")),)
    return create_router_app(RouterSettings(MODEL, 8192, "round_robin", backends))


async def test_infemu_runs_client_is_counted_from_its_send_and_measures_the_way_back(monkeypatch):
    """`infemu run`'s client (it holds the cluster token) stamps when each request was due: the worker
    counts from that stamp, not from when the request reached it, and reports when the model released
    the first token. Another client's stamp backdates nothing and is told nothing."""
    from emulator.serve.app import ARRIVAL_HEADER, FIRST_DUE_COMMENT, FIRST_DUE_HEADER, WORKER
    from emulator.serve.internal import INTERNAL_TOKEN_HEADER, TOKEN_ENV

    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    cluster = load_clusters(example("quickstart.yaml"))[0]
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 3, "stream": True}
    backdate = 0.3  # far above a lone request's modelled TTFT (~10 ms), within the 1 s a stamp may lie back
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as worker:
        ttft = worker.app[WORKER].metrics.ttft
        async with TestClient(TestServer(await _router_over(worker))) as router:
            loop = asyncio.get_running_loop()
            sent = [0.0]

            async def one(headers: dict) -> tuple[str, float, float]:
                before = ttft._sum.get()
                sent[0] = loop.time()
                stamped = {**headers, ARRIVAL_HEADER: repr(sent[0] - backdate)}
                resp = await router.post("/v1/completions", json=body, headers=stamped)
                first_read = None
                text = ""
                async for raw in resp.content:
                    line = raw.decode()
                    if first_read is None and line.startswith("data: {"):
                        first_read = loop.time()
                    text += line
                return text, ttft._sum.get() - before, first_read

            text, counted, first_read = await one({INTERNAL_TOKEN_HEADER: "s3cret", FIRST_DUE_HEADER: "1"})
            due = [e for e in text.split("\n\n") if e.startswith(FIRST_DUE_COMMENT.decode())]
            assert len(due) == 1 and text.endswith("data: [DONE]\n\n")
            released = float(due[0][len(FIRST_DUE_COMMENT) :])
            # counted from the stamp: the idle engine started the prefill then, so the model released
            # the first token (~10 ms later) long before the client even sent the request
            assert released < sent[0] - backdate + 0.1 and 0 < counted < 0.1
            assert released <= first_read

            text, counted, first_read = await one({FIRST_DUE_HEADER: "1"})  # the same headers, no token
            assert FIRST_DUE_COMMENT.decode() not in text
            assert first_read - sent[0] > 0.002  # counted from the router's receipt: the modelled API time at least


async def test_the_way_back_that_infemu_runs_client_measures_reaches_the_workers(monkeypatch):
    from emulator.router.proxy import ROUTER
    from emulator.serve.app import PATH_OVERHEAD_HEADER, WORKER
    from emulator.serve.internal import INTERNAL_TOKEN_HEADER, TOKEN_ENV

    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    cluster = load_clusters(example("quickstart.yaml"))[0]
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as worker:
        router_app = await _router_over(worker)
        async with TestClient(TestServer(router_app)) as router:
            for headers, expected in (
                ({INTERNAL_TOKEN_HEADER: "s3cret", PATH_OVERHEAD_HEADER: "0.0042"}, 0.0042),
                ({PATH_OVERHEAD_HEADER: "0.5"}, 0.0042),  # a client's report is ignored
                ({INTERNAL_TOKEN_HEADER: "s3cret", PATH_OVERHEAD_HEADER: "7"}, 0.0042),  # absurd: ignored
                ({INTERNAL_TOKEN_HEADER: "s3cret", PATH_OVERHEAD_HEADER: "nan"}, 0.0042),
            ):
                assert (await router.post("/v1/completions", json=body, headers=headers)).status == 200
                assert router_app[ROUTER].path_overhead_s == expected
                assert worker.app[WORKER].api_path.path_overhead_s == expected


def test_the_client_reports_the_median_way_back_once_it_has_enough_first_tokens():
    from emulator.client import ClusterLink
    from emulator.serve.app import ARRIVAL_HEADER, PATH_OVERHEAD_HEADER

    link = ClusterLink("s3cret")
    assert PATH_OVERHEAD_HEADER not in link.headers(12.5) and link.headers(12.5)[ARRIVAL_HEADER] == "12.5"
    for back in (0.001, 0.002, -0.001, 2.0, 0.003, 0.004, 0.005, 0.006, 0.007):  # two impossible ones
        link.observe(100.0 + back, 100.0)
    assert PATH_OVERHEAD_HEADER not in link.headers(0.0)  # 7 samples: the launcher's figure stands
    link.observe(100.008, 100.0)
    assert float(link.headers(0.0)[PATH_OVERHEAD_HEADER]) == pytest.approx(0.0045)
    for _ in range(ClusterLink.WINDOW):  # the load changed: the estimate follows the last window only
        link.observe(100.010, 100.0)
    assert float(link.headers(0.0)[PATH_OVERHEAD_HEADER]) == pytest.approx(0.010)


async def test_a_steps_first_tokens_go_out_ahead_of_its_other_tokens(monkeypatch):
    """Worker, router and client each handle one step's tokens stream after stream: a first token at
    the back of the batch would add their whole burst to TTFT. The worker writes them where the engine
    delivers them, in that order: none waits for its stream's task (first tokens included), while the
    client reads."""
    import emulator.serve.engine_loop as engine_loop

    delivered: list[list] = []
    deferred: list[str] = []
    deliver = engine_loop._deliver

    def record(events):
        delivered.append([(h.request.request_id, ev.count) for h, ev in events if ev.kind == "tokens"])
        deferred.extend(h.request.request_id for h, ev in events if ev.kind == "tokens" and h.sink is None)
        deliver(events)

    monkeypatch.setattr(engine_loop, "_deliver", record)
    cluster = load_clusters(example("quickstart.yaml"))[0]
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as c:
        streams = []
        for i in range(6):  # each joins the running batch while the earlier ones decode
            body = {"model": MODEL, "prompt": f"p{i}", "max_tokens": 40, "ignore_eos": True, "stream": True}
            streams.append(asyncio.ensure_future(c.post("/v1/completions", json=body)))
            await asyncio.sleep(0.03)
        for resp in await asyncio.gather(*streams):
            assert resp.status == 200 and len(await sse_events(resp)) == 40 + 2
    # a step that gave some requests their first token and others their next: the new ones lead
    seen: set[str] = set()
    checked = 0
    for step in delivered:
        new = [rid not in seen for rid, _ in step]
        seen.update(rid for rid, _ in step)
        if 0 < sum(new) < len(new):
            checked += 1
            assert new == sorted(new, reverse=True), step
    assert checked >= 3
    assert not deferred


async def test_a_stream_whose_socket_is_backed_up_goes_through_its_task_unchanged(monkeypatch):
    """A reader that does not keep up must not make the worker buffer without bound: past the limit a
    step's tokens go through the stream's task, which awaits the socket's drain. With the limit below
    zero every step takes that way; the stream reads exactly as when its tokens are written through."""
    import emulator.serve.app as app

    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 9, "ignore_eos": True, "stream": True}
    cluster = load_clusters(example("quickstart.yaml"))[0]
    streams = []
    for limit in (app.WRITE_THROUGH_LIMIT, -1):
        monkeypatch.setattr(app, "WRITE_THROUGH_LIMIT", limit)
        async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as c:
            events = await sse_events(await c.post("/v1/completions", json=body))
        streams.append(
            [e if e == "[DONE]" else (e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in events]
        )
    assert streams[0] == streams[1] and len(streams[0]) == 9 + 2


async def test_a_stream_interval_writes_every_nth_token_each_still_its_own_event():
    """engine.streamInterval 4 (vLLM's --stream-interval): the first token goes at once, then tokens go in
    fours, the last ones when the stream ends — one SSE event per token, the same texts and usage as at
    interval 1. At interval 4 steps last 40x their modelled time (~260 ms), so a burst's events (one
    write) arrive together and bursts arrive at least a step apart, each far from the 100 ms cut."""
    import itertools
    import time

    import yaml

    from emulator.spec import parse_cluster

    with open(example("quickstart.yaml"), encoding="utf-8") as fh:
        doc = yaml.safe_load(fh)
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 10, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    streams, arrivals = {}, []
    for interval in (1, 4):
        doc["spec"]["engine"] = {**doc["spec"].get("engine", {}), "streamInterval": interval}
        doc["spec"]["emulation"] = {**doc["spec"].get("emulation", {}), "timeDilation": 40 if interval > 1 else 1}
        async with TestClient(TestServer(create_app(WorkerSettings(parse_cluster(doc), "agg-0")))) as c:
            resp = await c.post("/v1/completions", json=body)
            events, arrivals = [], []
            async for raw in resp.content:
                line = raw.decode().strip()
                if line.startswith("data: ") and line != "data: [DONE]":
                    ev = json.loads(line[6:])
                    events.append(ev)
                    if ev["choices"] and ev["choices"][0]["text"]:
                        arrivals.append(time.monotonic())
        streams[interval] = [
            (e["choices"][0]["text"], e["choices"][0]["finish_reason"]) if e["choices"] else e["usage"] for e in events
        ]
    assert streams[4] == streams[1] and len(streams[4]) == 10 + 2
    assert streams[4][-1]["completion_tokens"] == 10
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    bursts = [1]
    for gap in gaps:  # a step lasts ~260 ms here; the events of one write arrive within a few ms
        if gap > 0.1:
            bursts.append(1)
        else:
            bursts[-1] += 1
    assert bursts == [1, 4, 4, 1], gaps


async def test_a_client_that_leaves_mid_stream_aborts_its_request_quietly(caplog):
    """A client that closes its stream (a benchmark's end, a router's cancelled attempt) is vLLM's
    aborted request: counted as one, its sequence freed, and no server error with a traceback in the
    worker's log (aiohttp logged one per stream, ~1.5 ms of CPU each, when the handler raised)."""
    import logging

    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "stream": True}

    class WorkerServer(TestServer):
        """As emulator/cluster/process.py serves a worker: aiohttp's default, no handler cancellation
        on a lost connection (TestServer's default cancels, a path the worker never takes)."""

        async def _make_runner(self, **kwargs):
            return await super()._make_runner(**{**kwargs, "handler_cancellation": False})

    cluster = load_clusters(example("quickstart.yaml"))[0]
    caplog.set_level(logging.DEBUG)
    async with TestClient(WorkerServer(create_app(WorkerSettings(cluster, "agg-0")))) as c:
        resp = await c.post("/v1/completions", json=body)
        assert resp.status == 200
        await resp.content.readline()  # the stream runs
        assert metric_samples(await (await c.get("/metrics")).text())[("vllm:num_requests_running", None)] == 1.0
        resp.close()  # and the client leaves
        now = await until_aborted(c)
        assert now[("vllm:num_requests_running", None)] == 0.0
        assert now[("vllm:request_success_total", "length")] == 0.0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert any("aborted: the client closed the stream" in r.getMessage() for r in caplog.records)


async def test_stop_strings_and_stop_tokens_end_the_answer_where_vllm_would(client):
    """``stop`` and ``stop_token_ids`` were once accepted and ignored. Now the answer ends at the token
    that completes a stop string, its text cut where the string begins (vLLM's default), finish_reason
    "stop" and stop_reason the string; a stop token ends it with its id, its text left out. Streamed
    and whole answers agree, and min_tokens holds the check off."""
    from emulator.serve.tokens import output_token, prompt_seed, tokenize

    prompt = "where do the tokens stop"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "ignore_eos": True}
    plain = await (await client.post("/v1/completions", json=body)).json()
    full = plain["choices"][0]["text"]
    assert plain["usage"]["completion_tokens"] == 40 and plain["choices"][0]["stop_reason"] is None
    words = full.split()
    word = words[6]
    first = words.index(word)  # the answer ends at its first occurrence
    stop = f" {word}"

    def check(choice, usage, text, n, reason):
        assert choice["finish_reason"] == "stop" and choice.get("stop_reason", reason) == reason
        assert usage["completion_tokens"] == n
        assert text == full[: len(text)] and text == " ".join(words[:first])

    whole = await (await client.post("/v1/completions", json={**body, "stop": ["</s>", stop]})).json()
    check(whole["choices"][0], whole["usage"], whole["choices"][0]["text"], first + 1, stop)
    streamed = await sse_events(
        await client.post(
            "/v1/completions",
            json={**body, "stop": ["</s>", stop], "stream": True, "stream_options": {"include_usage": True}},
        )
    )
    chunks = [e for e in streamed if e != "[DONE]"]
    text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    check(chunks[-2]["choices"][0], chunks[-1]["usage"], text, first + 1, stop)
    # a stop string the synthetic text never holds changes nothing
    never = await (await client.post("/v1/completions", json={**body, "stop": "<|eot_id|>"})).json()
    assert never["choices"][0]["text"] == full and never["choices"][0]["finish_reason"] == "length"
    # a stop token: the 10th token's id ends the answer after 10 tokens, without its text
    seed = prompt_seed(tokenize(prompt, 128256))
    token_id = output_token(seed, 9, 128256)[0]
    by_id = await (await client.post("/v1/completions", json={**body, "stop_token_ids": [token_id]})).json()
    assert by_id["usage"]["completion_tokens"] == 10 and by_id["choices"][0]["stop_reason"] == token_id
    assert by_id["choices"][0]["text"] == " ".join(words[:9])
    # min_tokens: nothing is checked before that many tokens are out
    held = await (await client.post("/v1/completions", json={**body, "stop": stop, "min_tokens": 40})).json()
    assert held["choices"][0]["text"] == full and held["usage"]["completion_tokens"] == 40
    # chat: the same rule on the assistant's text
    chat = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "ignore_eos": True}
    chat_full = (await (await client.post("/v1/chat/completions", json=chat)).json())["choices"][0]["message"]
    cut_word = chat_full["content"].split()[3]
    chat_cut = await (await client.post("/v1/chat/completions", json={**chat, "stop": [cut_word]})).json()
    content = chat_cut["choices"][0]["message"]["content"]
    assert chat_cut["choices"][0]["finish_reason"] == "stop" and cut_word not in content
    assert chat_cut["choices"][0]["stop_reason"] == cut_word
    assert chat_full["content"].startswith(content)


async def test_sampling_parameters_vllm_accepts_are_accepted(client):
    """The range checks refuse only what vLLM refuses: the usual values pass and leave the synthetic
    answer as it is (sampling is not emulated; the answer is a function of the prompt)."""
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 5, "ignore_eos": True}
    plain = (await (await client.post("/v1/completions", json=body)).json())["choices"][0]["text"]
    for params in (
        {"temperature": 0},
        {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "seed": 42},
        {"top_p": 1, "top_k": -1, "min_p": 0.05, "presence_penalty": -2, "frequency_penalty": 2},
        {"top_k": 0, "repetition_penalty": 1.1, "temperature": None},
    ):
        resp = await client.post("/v1/completions", json={**body, **params})
        assert resp.status == 200, (params, await resp.text())
        assert (await resp.json())["choices"][0]["text"] == plain


async def test_tool_definitions_and_tool_calls_are_prompt_tokens(client):
    """A chat template renders the request's tools and an assistant turn's tool calls into the prompt:
    agentic traffic prefills (and caches) them. They were once dropped from the count, so a request
    with a few hundred tokens of tool schemas cost the engine nothing more. Malformed tools get vLLM's
    400; the tokenizer endpoint counts them as the completion does."""
    from loadgen.workloads import TOOLS

    messages = [{"role": "user", "content": "what is the fleet's p99 TTFT"}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2}

    async def prompt_tokens(**extra) -> int:
        resp = await client.post("/v1/chat/completions", json={**body, **extra})
        assert resp.status == 200, await resp.text()
        return (await resp.json())["usage"]["prompt_tokens"]

    bare = await prompt_tokens()
    with_tools = await prompt_tokens(tools=TOOLS)
    assert with_tools > bare + 300  # six schemas, a few hundred tokens
    tokenized = await (await client.post("/tokenize", json={"messages": messages, "tools": TOOLS})).json()
    assert tokenized["count"] == with_tools
    call = {"id": "c1", "type": "function", "function": {"name": "get_metrics", "arguments": '{"query": "up"}'}}
    turns = [*messages, {"role": "assistant", "content": None, "tool_calls": [call]}]
    turns.append({"role": "tool", "tool_call_id": "c1", "content": "1"})
    with_call = await prompt_tokens(messages=turns)
    without_call = await prompt_tokens(messages=[*messages, {"role": "assistant", "content": None}, turns[-1]])
    assert with_call > without_call + 5
    for bad in ({"type": "function"}, [{"type": "function", "function": {}}], ["get_metrics"]):
        resp = await client.post("/v1/chat/completions", json={**body, "tools": bad})
        assert resp.status == 400 and (await resp.json())["error"]["param"] == "tools"


async def test_continuous_usage_stats_put_the_running_usage_in_every_chunk(client):
    """``stream_options.continuous_usage_stats`` (with ``include_usage``) was once ignored. vLLM then
    puts the running usage in every chunk: clients that count tokens from it (rather than from the
    chunks) read the same count as the final usage. The text is the stream's without it; a logit_bias
    is accepted (it does not change a synthetic answer)."""
    for path, body in (
        ("/v1/completions", {"prompt": "count the tokens as they come"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "count the tokens as they come"}]}),
    ):
        base = {"model": MODEL, **body, "max_tokens": 6, "ignore_eos": True, "stream": True, "logit_bias": {"17": -100}}
        plain = await sse_events(await client.post(path, json={**base, "stream_options": {"include_usage": True}}))
        opts = {"include_usage": True, "continuous_usage_stats": True}
        counted = await sse_events(await client.post(path, json={**base, "stream_options": opts}))
        assert counted[-1] == "[DONE]" and len(counted) == len(plain)
        final = counted[-2]["usage"]
        assert final["completion_tokens"] == 6 and final == plain[-2]["usage"]
        chunks = counted[:-2]
        assert all(c["usage"]["prompt_tokens"] == final["prompt_tokens"] for c in chunks)
        running = [c["usage"]["completion_tokens"] for c in chunks]
        assert (
            running == sorted(running)
            and running[-1] == 6
            and all(
                c["usage"]["total_tokens"] == c["usage"]["prompt_tokens"] + c["usage"]["completion_tokens"]
                for c in chunks
            )
        )
        strip = lambda events: [{k: v for k, v in c.items() if k not in ("usage", "id", "created")}  # noqa: E731
                                for c in events[:-2]]  # fmt: skip
        assert strip(counted) == strip(plain)  # the same chunks, with the usage added
        assert all("usage" not in c for c in plain[:-2])


async def test_malformed_chat_bodies_are_the_workers_400_even_through_a_prefix_affinity_router():
    """The prefix-affinity router tokenizes a chat prompt to choose a backend before any check: a
    malformed one must not make it fail (the worker answers it with a 400), and a tool schema nested
    as deep as the JSON parser allows is refused, not rendered into a RecursionError (a 500)."""
    from emulator.router.proxy import RouterSettings, create_router_app

    deep: dict = {}
    cur = deep
    for _ in range(900):
        cur["a"] = {}
        cur = cur["a"]
    bodies = [
        {"messages": ["just a string"]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user", "content": "hi"}], "tools": "all of them"},
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"function": {"name": "f", "parameters": deep}}]},
    ]
    cluster = load_clusters(example("quickstart.yaml"))[0]
    async with TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as worker:
        backends = (("agg-0", "aggregated", str(worker.make_url("")).rstrip("/")),)
        router = create_router_app(RouterSettings(MODEL, 8192, "prefix_affinity", backends))
        async with TestClient(TestServer(router)) as c:
            for body in bodies:
                for client in (worker, c):
                    resp = await client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, **body})
                    assert resp.status == 400, (body, await resp.text())
                    assert (await resp.json())["error"]["code"] == "invalid_value"


async def test_engines_ending_steps_in_one_wake_up_deliver_before_either_launches_its_next_step(tmp_path):
    """Instances sharing a worker process (instancesPerProcess) end their steps in the same wake-up when
    their deadlines coincide. Each step's tokens are what the clients see; launching the next step
    (scheduling, pricing, metrics) is the engine's own bookkeeping, and its next step starts at the
    deadline whenever that runs. So every engine due in the wake-up delivers first, and the launches
    follow: otherwise each engine's launch work lies between the next engine's deadline and its tokens.
    Fails when an engine launches its next step inside its step's end."""
    from emulator.engine.request import Request
    from emulator.serve.app import WORKER
    from emulator.serve.engine_loop import Handle

    spec = tmp_path / "two.yaml"
    spec.write_text(
        "apiVersion: infemu.io/v1alpha1\nkind: InferenceCluster\nmetadata: {name: two}\n"
        "spec:\n  model: llama-3.1-8b\n  pools:\n    - {name: agg, replicas: 2}\n"
    )
    cluster = load_clusters(str(spec))[0]
    order: list[str] = []
    async with (
        TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-0")))) as a,
        TestClient(TestServer(create_app(WorkerSettings(cluster, "agg-1")))) as b,
    ):
        engines = {"agg-0": a.app[WORKER].engine, "agg-1": b.app[WORKER].engine}
        for engine in engines.values():
            engine.api_path = None  # tokens leave at the step's end, not after a modelled API-server delay
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05  # both admit their request at the same instant: the same deadlines
        done = {name: loop.create_future() for name in engines}
        for name, engine in engines.items():
            launch = engine._try_launch

            def logged(begin, _name=name, _launch=launch):
                order.append(f"launch {_name}")
                _launch(begin)

            engine._try_launch = logged

            def sink(ev, _name=name) -> bool:
                if ev.kind == "tokens":
                    order.append(f"tokens {_name}")
                elif not done[_name].done():
                    done[_name].set_result(None)
                return True

            handle: Handle = engine.add(Request(f"r-{name}", 16, 3, start), start_at=start)
            handle.sink = sink
        await asyncio.wait_for(asyncio.gather(*done.values()), 10)
    # the first launches (at admission), then per step: both engines' tokens, then both launches
    kinds = [entry.split()[0] for entry in order]
    assert kinds == ["launch", "launch"] + ["tokens", "tokens", "launch", "launch"] * 3, order
