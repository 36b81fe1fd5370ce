"""An HTTP upload whose body goes through a shaped link: the sender paces, the receiver just reads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import ClientResponse, ClientSession


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
