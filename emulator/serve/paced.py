"""HTTP bodies through a shaped link, both ways: the sender paces (or, with tc, marks the socket for
its tier's class), the receiver just reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import ClientResponse, ClientSession, web

from emulator.net.tc import KernelLink


@asynccontextmanager
async def paced_post(
    session: ClientSession, url: str, link, wire_bytes: int, headers: dict[str, str]
) -> AsyncIterator[ClientResponse]:
    """POST ``wire_bytes`` of payload to ``url``, paced by ``link`` (a ``PacedLink`` or ``KernelLink``)."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def body():
        while (chunk := await queue.get()) is not None:
            yield chunk

    async def pace() -> None:
        await link.send(wire_bytes, queue.put)
        await queue.put(None)

    sender = asyncio.ensure_future(pace())
    try:
        async with session.post(url, data=body(), headers=headers) as resp:
            yield resp
    finally:
        sender.cancel()


async def send_paced(request: web.Request, resp: web.StreamResponse, link, wire_bytes: int) -> None:
    """Answer ``request`` with ``wire_bytes`` of payload through ``link`` (headers set by the caller)."""
    await resp.prepare(request)
    if isinstance(link, KernelLink):
        link.mark(request.transport.get_extra_info("socket") if request.transport else None)
    if wire_bytes:
        await link.send(wire_bytes, resp.write)
    await resp.write_eof()
