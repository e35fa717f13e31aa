"""The client's request body as the proxy sees it: replayable when small, streamed when not.

Failover needs the body again for the next worker. Bodies up to `routing.retry_buffer_mb`
are read into memory first; bigger ones stream straight from the client and can be retried
only while not a byte of them has been sent. Either way the size limit and the client's
idle limit are enforced here, the one place a body is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import trio

Receive = Callable[[], Awaitable[dict[str, Any]]]


class ClientDisconnected(Exception):
    """The client went away while the router was still reading its request."""


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body exceeds the limit of {limit // (1024 * 1024)} MiB")


class ClientTooSlow(Exception):
    def __init__(self, idle_s: float) -> None:
        super().__init__(f"Client sent no body data for {idle_s:g}s")


class RequestBody:
    def __init__(
        self,
        receive: Receive,
        *,
        present: bool,
        content_length: int | None,
        max_bytes: int,
        idle_s: float,
    ) -> None:
        self._receive = receive
        self.present = present
        self.content_length = content_length
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self.done = trio.Event()
        """Set once the client's last body message was read: disconnects are watched after."""
        self.buffered: bytes | None = None if present else b""
        self._prefix = b""
        self.received = 0
        self.started = False
        if not present:
            self.done.set()

    @property
    def replayable(self) -> bool:
        return self.buffered is not None or not self.started

    async def buffer_up_to(self, limit: int) -> None:
        """Read the body into memory if it fits in `limit` bytes; otherwise keep a prefix."""
        if self.buffered is not None:
            return
        if self.content_length is not None and self.content_length > limit:
            return
        chunks = bytearray()
        async for chunk in self._messages():
            chunks += chunk
            if len(chunks) > limit:
                self._prefix = bytes(chunks)
                return
        self.buffered = bytes(chunks)

    def content(self) -> bytes | AsyncIterator[bytes] | None:
        """What to hand to the upstream request: bytes, a one-shot stream, or nothing."""
        if not self.present:
            return None
        if self.buffered is not None:
            return self.buffered
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        self.started = True
        if self._prefix:
            yield self._prefix
        async for chunk in self._messages():
            yield chunk

    async def _messages(self) -> AsyncIterator[bytes]:
        while not self.done.is_set():
            with trio.move_on_after(self.idle_s) as idle:
                message = await self._receive()
            if idle.cancelled_caught:
                raise ClientTooSlow(self.idle_s)
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            self.received += len(chunk)
            if self.received > self.max_bytes:
                raise BodyTooLarge(self.max_bytes)
            if not message.get("more_body", False):
                self.done.set()
            if chunk:
                yield chunk
