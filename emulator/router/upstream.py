"""The router's HTTP/1.1 client for its backends: a streamed answer's bytes relayed where they arrive.

aiohttp's client hands a body over through a ``StreamReader`` that a task awaits, so relaying a
stream woke the relay's task once per block, and a block is one engine step's tokens: at 256
streams the router spent 24-37 µs of CPU per streamed token, twice the worker that made it
(``benchmarks/emulation_capacity.py --profile 256``, 2026-11-29), and on a laptop that runs many
instances behind one router it was the largest consumer of the host's cores. Here each
connection's parser (httptools, the llhttp binding uvicorn uses) hands every decoded body block to
a sink as it is parsed, and the sink writes it to the client's socket at once. Only a block the
client's socket cannot take now waits for the relay's task, with the backend's socket paused
meanwhile, so a slow client holds one block in memory, not the stream.

Connections are kept alive per backend and reused as aiohttp's connector reused them. A request
that a kept connection fails before a byte of its answer came back (the backend closed it while it
sat idle) is sent once more on a new connection.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit

import httptools

MAX_HEADER_BYTES = 64 * 1024  # a backend's response head; more is a broken backend, not an answer
MAX_WHOLE_BYTES = 64 * 1024 * 1024  # a whole (non-streamed) answer read into memory: the router's own request limit
KEEP_IDLE_S = 15.0  # aiohttp's connector keeps an idle connection this long (TCPConnector keepalive_timeout)
MAX_IDLE_PER_BACKEND = 1024


class UpstreamError(ConnectionError):
    """The backend could not be reached (``refused``), or its connection broke or sent no valid answer."""

    def __init__(self, message: str, refused: bool = False) -> None:
        super().__init__(message)
        self.refused = refused


class NoFirstByte(Exception):
    """The stream's headers came, its first body byte not by the first-byte deadline."""


Sink = Callable[[bytes], bool]  # takes a block now (True), or leaves it to the async write (False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to a backend and the answer it is receiving."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}  # by lower-case name
        self._header_bytes = 0
        self._head_rx = 0  # bytes received while the head is incomplete
        self.head: asyncio.Future[None] = self.loop.create_future()
        self.complete = False
        self.keep_alive = False
        self.any_byte = False
        self.error: BaseException | None = None
        self.body: collections.deque[bytes] = collections.deque()
        self.body_bytes = 0
        self.sink: Sink | None = None
        self.last_rx = 0.0
        self.paused = False
        self._waiter: asyncio.Future[None] | None = None

    # ---- asyncio.Protocol -------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.any_byte = True
        self.last_rx = self.loop.time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else None
            self._fail(cause if isinstance(cause, UpstreamError) else UpstreamError(f"a malformed answer: {exc}"))
            self.close()
            return
        if not self.head.done():  # httptools gathers a header's value whole before on_header sees it
            self._head_rx += len(data)
            if self._head_rx > MAX_HEADER_BYTES:
                self._fail(UpstreamError(f"the answer's headers exceed {MAX_HEADER_BYTES} bytes"))
                self.close()

    def eof_received(self) -> bool:
        return False  # the transport closes: connection_lost says what that meant

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        if self.complete:
            return
        if self.head.done() and not self._framed():  # a body delimited by the connection's end
            self.on_message_complete()
            return
        why = f": {exc}" if exc else ""
        self._fail(UpstreamError(f"the backend closed the connection before its answer ended{why}"))

    # ---- httptools callbacks -------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > MAX_HEADER_BYTES:
            raise UpstreamError(f"the answer's headers exceed {MAX_HEADER_BYTES} bytes")
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        self.headers[key] = f"{self.headers[key]}, {text}" if key in self.headers else text

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if not self.head.done():
            self.head.set_result(None)

    def on_body(self, body: bytes) -> None:
        sink = self.sink
        if sink is not None and not self.body:
            try:
                if sink(body):
                    return
            except Exception as exc:  # the client's side failed (it left): the relay's task raises it
                self._fail(exc)
                self.pause()
                return
            self.pause()  # the client's socket is backed up: the backend's bytes wait in the kernel
        self.body_bytes += len(body)
        if self.sink is None and self.body_bytes > MAX_WHOLE_BYTES:
            raise UpstreamError(f"the answer exceeds {MAX_WHOLE_BYTES} bytes")
        self.body.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()  # llhttp forgets it once the message is over
        self._wake()

    # ---- the answer's reader -------------------------------------------------------------
    def _framed(self) -> bool:
        return "content-length" in self.headers or "chunked" in self.headers.get("transfer-encoding", "").lower()

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # retrieved here: a request that gave up on the head never reads it
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self, until: float | None, whole: bool = False) -> None:
        """Until a block is left for the task (unless it waits for the ``whole`` answer), the answer ends
        or fails, or loop time ``until``."""
        if (self.body and not whole) or self.complete or self.error is not None:
            return
        self._waiter = self.loop.create_future()
        timer = self.loop.call_at(until, self._wake) if until is not None else None
        try:
            await self._waiter
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Answer:
    """A backend's answer once its status line and headers came (``headers`` by lower-case name);
    ``async with`` releases its connection (kept for reuse only when the answer ended cleanly)."""

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers

    async def __aenter__(self) -> Answer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        conn = self._conn
        conn.sink = None
        if conn.complete and conn.keep_alive and conn.error is None and not conn.closed:
            conn.pool._keep(conn)
        else:
            conn.close()

    async def read(self) -> bytes:
        """The whole answer (at most ``MAX_WHOLE_BYTES``)."""
        conn = self._conn
        while not conn.complete and conn.error is None:
            await conn.wait(None, whole=True)
        if conn.error is not None:
            raise conn.error
        data = b"".join(conn.body)
        conn.body.clear()
        return data

    async def relay(
        self,
        sink: Sink,
        write: Callable[[bytes], Awaitable[None]],
        idle_s: float,
        first_by: float | None = None,
    ) -> None:
        """Hand every body block to ``sink`` as it is parsed, or to ``write`` (awaited, in order) when the
        sink cannot take it now, until the answer ends. A silence of ``idle_s`` is a stall
        (TimeoutError); without a body byte by loop time ``first_by`` it is no answer (NoFirstByte). An
        error raised by the sink or ``write`` (the client left) ends the relay with it."""
        conn = self._conn
        loop = conn.loop
        if first_by is not None:
            while not conn.body and not conn.complete and conn.error is None:
                if loop.time() >= first_by:
                    raise NoFirstByte
                await conn.wait(first_by)
        conn.sink = sink
        while True:
            while conn.body:  # blocks the sink left (the first, or a backed-up client's): in order
                block = conn.body.popleft()
                if not sink(block):
                    await write(block)
                    conn.last_rx = loop.time()  # a slow client's write is not the backend's silence
            conn.resume()
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return
            deadline = conn.last_rx + idle_s
            if loop.time() >= deadline:
                raise asyncio.TimeoutError(f"no byte for {idle_s} s")
            await conn.wait(deadline)


class UpstreamPool:
    """Keep-alive connections to the backends, by host and port."""

    def __init__(self, connect_s: float) -> None:
        self.connect_s = connect_s
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._addresses: dict[str, tuple[str, int]] = {}

    def _address(self, url: str) -> tuple[str, int]:
        address = self._addresses.get(url)
        if address is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise UpstreamError(f"backend URL {url!r} is not http://host[:port]", refused=True)
            address = self._addresses[url] = (parts.hostname, parts.port or 80)
        return address

    async def post(
        self, url: str, path: str, body: bytes, headers: Mapping[str, str], head_by: float | None = None
    ) -> Answer:
        """POST ``body`` (JSON) to the backend at ``url`` and wait for its answer's headers, until loop time
        ``head_by`` (TimeoutError past it). UpstreamError(refused=True) when it cannot be reached."""
        key = self._address(url)
        request = _request_head(key, path, len(body), headers) + body
        conn = self._take(key)
        if conn is not None:  # a kept connection the backend may have closed meanwhile
            try:
                return await self._send(conn, request, head_by)
            except UpstreamError:
                if conn.any_byte:
                    raise
        return await self._send(await self._connect(key), request, head_by)

    async def _connect(self, key: tuple[str, int]) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(self, key), key[0], key[1]), self.connect_s
            )
        except (OSError, asyncio.TimeoutError) as exc:
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]}: {exc or 'timed out'}", refused=True) from None
        return conn

    async def _send(self, conn: _Connection, request: bytes, head_by: float | None) -> Answer:
        assert conn.transport is not None
        conn._reset()
        conn.transport.write(request)
        try:
            if head_by is not None:  # asyncio.wait watches the future without wrapping it in a task
                await asyncio.wait({conn.head}, timeout=max(head_by - conn.loop.time(), 0.0))
                if not conn.head.done():
                    raise asyncio.TimeoutError("no answer's head by the deadline")
            await conn.head
        except BaseException:
            conn.close()
            raise
        return Answer(conn)

    def _take(self, key: tuple[str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < KEEP_IDLE_S:
                return conn
            conn.close()
        return None

    def _keep(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_BACKEND:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _request_head(key: tuple[str, int], path: str, length: int, headers: Mapping[str, str]) -> bytes:
    """An HTTP/1.1 POST's head. A header that could end the head early (CR or LF) is refused: the values
    are the router's own, and none may let anything a client sent reach the backend as a header."""
    host = f"[{key[0]}]" if ":" in key[0] else key[0]  # an IPv6 literal
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{key[1]}", f"Content-Length: {length}"]
    if "Content-Type" not in headers:
        lines.append("Content-Type: application/json")
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n") or ":" in name:
            raise ValueError(f"header {name!r} would break the request's head")
        lines.append(f"{name}: {value}")
    if any(c in path for c in "\r\n "):
        raise ValueError(f"path {path!r} would break the request line")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
