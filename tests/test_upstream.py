"""The router's backend client (emulator/router/upstream.py): streamed answers pushed block by block,
kept connections, and every way a backend can fail it ending in an explicit error."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from emulator.router import upstream
from emulator.router.upstream import NoFirstByte, UpstreamError, UpstreamPool

BLOCKS = [f"data: token {i}\n\n".encode() for i in range(12)]


def _streaming_app(peers: list) -> web.Application:
    """A backend that streams BLOCKS as chunks, each after a short pause (an engine's steps), and
    records which connection each request came on."""

    async def stream(request: web.Request) -> web.StreamResponse:
        peers.append(request.transport.get_extra_info("peername"))
        assert await request.json() == {"prompt": "hi"}
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for block in BLOCKS:
            await asyncio.sleep(0.002)
            await resp.write(block)
        await resp.write_eof()
        return resp

    async def whole(request: web.Request) -> web.Response:
        return web.json_response({"ok": True, "x-seen": request.headers.get("X-Router-Id")}, status=418)

    app = web.Application()
    app.router.add_post("/stream", stream)
    app.router.add_post("/whole", whole)
    return app


async def _raw_backend(answer) -> tuple[asyncio.AbstractServer, str]:
    """A backend speaking raw HTTP: it reads one request, then ``answer(writer)`` writes whatever it
    writes and the connection closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.lower().split(b"\r\n")
        length = next(int(ln.split(b":")[1]) for ln in lines if ln.startswith(b"content-length"))
        await reader.readexactly(length)
        await answer(writer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


def _taking(got: list[bytes]):
    """A sink that takes every block (a client whose socket keeps up)."""

    def sink(block: bytes) -> bool:
        got.append(block)
        return True

    return sink


async def test_a_streamed_answer_reaches_the_sink_block_by_block_and_its_connection_is_kept():
    peers: list = []
    async with TestServer(_streaming_app(peers)) as server:
        pool = UpstreamPool(connect_s=2.0)
        url = str(server.make_url("")).rstrip("/")
        loop = asyncio.get_running_loop()
        for _ in range(2):
            got: list[bytes] = []
            sink = _taking(got)

            async def write(block: bytes) -> None:
                raise AssertionError("every block was taken where it was parsed")

            async with await pool.post(url, "/stream", b'{"prompt": "hi"}', {}, loop.time() + 5) as answer:
                assert answer.status == 200 and answer.headers["content-type"] == "text/event-stream"
                await answer.relay(sink, write, idle_s=5.0, first_by=loop.time() + 5)
            assert b"".join(got) == b"".join(BLOCKS)
            assert len(got) >= len(BLOCKS) // 2  # pushed as the chunks came, not read whole at the end
        async with await pool.post(url, "/whole", b"{}", {"X-Router-Id": "r-1"}) as answer:
            assert answer.status == 418
            assert await answer.read() == b'{"ok": true, "x-seen": "r-1"}'
        pool.close()
    assert len(peers) == 2 and peers[0] == peers[1]  # the second stream came on the kept connection


async def test_blocks_a_backed_up_client_cannot_take_go_through_the_write_in_order():
    """A sink that cannot take a block now (the client's socket is backed up) leaves it, and every block
    after it, to the awaited write: nothing is lost or reordered, and the backend is paused meanwhile."""
    async with TestServer(_streaming_app([])) as server:
        pool = UpstreamPool(connect_s=2.0)
        url = str(server.make_url("")).rstrip("/")
        got: list[bytes] = []
        refused = 0

        def sink(block: bytes) -> bool:
            nonlocal refused
            if len(got) % 3 == 1:
                refused += 1
                return False
            got.append(block)
            return True

        async def write(block: bytes) -> None:
            await asyncio.sleep(0.01)  # a slow client
            got.append(block)

        async with await pool.post(url, "/stream", b'{"prompt": "hi"}', {}) as answer:
            await answer.relay(sink, write, idle_s=5.0)
        pool.close()
    assert refused and b"".join(got) == b"".join(BLOCKS)


async def test_a_stream_that_breaks_off_is_an_error_and_its_connection_is_not_kept():
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"f\r\ndata: token 0\n\n\r\n")

    server, url = await _raw_backend(answer)
    async with server:
        pool = UpstreamPool(connect_s=2.0)
        got: list[bytes] = []
        sink = _taking(got)
        async with await pool.post(url, "/v1/completions", b"{}", {}) as ans:
            with pytest.raises(UpstreamError, match="closed the connection before its answer ended"):
                await ans.relay(sink, None, idle_s=5.0)  # type: ignore[arg-type]
        assert got == [b"data: token 0\n\n"] and not any(pool._idle.values())


async def test_a_silent_stream_is_no_answer_before_its_first_byte_and_a_stall_after_it():
    async def silent(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    async def one_then_silent(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"f\r\ndata: token 0\n\n\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    loop = asyncio.get_running_loop()
    pool = UpstreamPool(connect_s=2.0)
    server, url = await _raw_backend(silent)
    async with server, await pool.post(url, "/x", b"{}", {}, loop.time() + 5) as ans:
        started = loop.time()
        with pytest.raises(NoFirstByte):
            await ans.relay(lambda b: True, None, idle_s=30.0, first_by=started + 0.2)  # type: ignore[arg-type]
        assert 0.2 <= loop.time() - started < 5
    server, url = await _raw_backend(one_then_silent)
    async with server, await pool.post(url, "/x", b"{}", {}, loop.time() + 5) as ans:
        started = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await ans.relay(lambda b: True, None, idle_s=0.3, first_by=started + 5)  # type: ignore[arg-type]
        assert 0.3 <= loop.time() - started < 5
    pool.close()


async def test_a_head_that_never_completes_times_out_and_an_oversized_one_is_an_error(monkeypatch):
    async def half_head(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/ev")
        await writer.drain()
        await asyncio.sleep(30)

    async def huge_head(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\n" + b"X-Filler: " + b"a" * 2000 + b"\r\n" * 1)
        writer.write(b"X-More: " + b"b" * 2000 + b"\r\nContent-Length: 0\r\n\r\n")

    async def endless_header(writer: asyncio.StreamWriter) -> None:  # one value that never ends
        writer.write(b"HTTP/1.1 200 OK\r\nX-Filler: ")
        for _ in range(100):
            writer.write(b"a" * 1000)
            await writer.drain()

    loop = asyncio.get_running_loop()
    pool = UpstreamPool(connect_s=2.0)
    server, url = await _raw_backend(half_head)
    async with server:
        with pytest.raises(asyncio.TimeoutError):
            await pool.post(url, "/x", b"{}", {}, loop.time() + 0.3)
    monkeypatch.setattr(upstream, "MAX_HEADER_BYTES", 3000)
    server, url = await _raw_backend(huge_head)
    async with server:
        with pytest.raises(UpstreamError, match="headers exceed 3000 bytes"):
            await pool.post(url, "/x", b"{}", {}, loop.time() + 5)
    server, url = await _raw_backend(endless_header)
    async with server:
        with pytest.raises(UpstreamError, match="headers exceed 3000 bytes"):
            await pool.post(url, "/x", b"{}", {}, loop.time() + 5)
    pool.close()


async def test_a_whole_answer_past_the_limit_is_an_error_not_memory(monkeypatch):
    async def big(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n")
        for _ in range(100):
            writer.write(b"x" * 1000)
            await writer.drain()

    monkeypatch.setattr(upstream, "MAX_WHOLE_BYTES", 10_000)
    pool = UpstreamPool(connect_s=2.0)
    server, url = await _raw_backend(big)
    async with server, await pool.post(url, "/x", b"{}", {}) as ans:
        with pytest.raises(UpstreamError, match="exceeds 10000 bytes"):
            await ans.read()
    pool.close()


async def test_an_unreachable_backend_is_refused_and_no_header_can_split_the_request():
    pool = UpstreamPool(connect_s=2.0)
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    with pytest.raises(UpstreamError) as caught:
        await pool.post(f"http://127.0.0.1:{port}", "/x", b"{}", {})
    assert caught.value.refused
    with pytest.raises(UpstreamError, match="not http"):
        await pool.post("https://127.0.0.1:1", "/x", b"{}", {})
    for headers, path in (({"X-Id": "a\r\nX-Evil: 1"}, "/x"), ({"X-Id": "a"}, "/x HTTP/1.1\r\nX-Evil: 1")):
        with pytest.raises(ValueError, match="would break"):
            await pool.post(f"http://127.0.0.1:{port}", path, b"{}", headers)


async def test_routed_streams_share_a_kept_connection_and_a_client_that_leaves_aborts_the_workers_request():
    """Through the router: two whole streams travel one kept connection to the worker; a client that
    then leaves mid-stream makes the router drop its connection to the worker, which counts the
    request as vLLM's aborted one and frees its sequence."""
    from aiohttp.test_utils import TestClient
    from conftest import example, until_aborted

    from emulator.router.proxy import RouterSettings, create_router_app
    from emulator.serve.app import WorkerSettings, create_app
    from emulator.spec import load_clusters

    model = "llama-3.1-8b"

    class WorkerServer(TestServer):
        """As emulator/cluster/process.py serves a worker: no handler cancellation on a lost connection."""

        async def _make_runner(self, **kwargs):
            return await super()._make_runner(**{**kwargs, "handler_cancellation": False})

    peers: set = set()

    @web.middleware
    async def note_peer(request: web.Request, handler):
        if request.path.startswith("/v1/"):
            peers.add(request.transport.get_extra_info("peername"))
        return await handler(request)

    cluster = load_clusters(example("quickstart.yaml"))[0]
    worker_app = create_app(WorkerSettings(cluster, "agg-0"))
    worker_app.middlewares.append(note_peer)
    async with TestClient(WorkerServer(worker_app)) as worker:
        backends = (("agg-0", "aggregated", str(worker.make_url("")).rstrip("/")),)
        async with TestClient(TestServer(create_router_app(RouterSettings(model, 8192, "round_robin", backends)))) as c:
            body = {"model": model, "prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True, "stream": True}
            for _ in range(2):
                text = await (await c.post("/v1/completions", json=body)).text()
                assert text.count('"text":') == 4 + 1 and text.endswith("data: [DONE]\n\n")
            assert len(peers) == 1  # the second request came on the router's kept connection
            resp = await c.post("/v1/completions", json={**body, "max_tokens": 2000})
            assert resp.status == 200
            await resp.content.readline()  # the stream runs
            resp.close()  # and the client leaves
            now = await until_aborted(worker)
            assert now[("vllm:num_requests_running", None)] == 0.0


async def test_a_kept_connection_the_backend_closed_is_replaced_without_failing_the_request():
    """The backend answers keep-alive (HTTP/1.1, no Connection: close) and then closes every connection:
    each next request finds its kept connection closed, at once or while it is sent, and goes out on a
    new one."""

    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")

    server, url = await _raw_backend(answer)
    pool = UpstreamPool(connect_s=2.0)
    async with server:
        for i in range(6):
            async with await pool.post(url, "/x", b"{}", {}) as ans:
                assert ans.status == 200 and await ans.read() == b"{}"
            if i % 2:
                await asyncio.sleep(0.05)  # the close has arrived: the kept connection is gone before it is taken
    pool.close()
