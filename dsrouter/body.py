"""The client's request body as the proxy sees it: replayable when small, streamed when not.

Failover needs the body again for the next worker. Bodies up to `routing.retry_buffer_mb`
are read into memory first; bigger ones stream straight from the client and can be retried
only while not a byte of them has been sent. Either way the size limit and the client's
idle limit are enforced here, the one place a body is read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import trio

from dsrouter.asgi import Receive
from dsrouter.units import MiB


class ClientDisconnected(Exception):
    """The client went away while the router was still reading its request."""


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"Request body exceeds the limit of {limit // MiB} MiB")


class ClientTooSlow(Exception):
    """The client's upload stalled or crawled; the message says which limit it broke."""


class BufferBudget:
    """Request body bytes held in memory for replay, summed over every request.

    Each request may keep up to `routing.retry_buffer_mb`, but a thousand slow uploads
    must not add up to gigabytes: past `server.max_buffered_mb` in total, bodies stream
    without a replay copy (they can still be retried before their first byte is sent).
    """

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        """Read at use, so a reload changes it for the next chunk."""
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self._limit():
            return False
        self.used += size
        return True

    def give_back(self, size: int) -> None:
        self.used -= size


class RequestBody:
    def __init__(
        self,
        receive: Receive,
        *,
        present: bool,
        content_length: int | None,
        max_bytes: int,
        idle_s: float,
        min_rate: float = 0.0,
        rate_grace_s: float = 0.0,
    ) -> None:
        self._receive = receive
        self.present = present
        self.content_length = content_length
        self.max_bytes = max_bytes
        self.idle_s = idle_s
        self.min_rate = min_rate
        """Bytes per second the upload must average once `rate_grace_s` have passed
        (0: no floor). The idle limit alone restarts with every byte, so one byte every
        few seconds would hold a connection, a slot and a buffer for as long as it likes."""
        self.rate_grace_s = rate_grace_s
        self.started_at = trio.current_time()
        self.done = trio.Event()
        """Set once the client's last body message was read: disconnects are watched after."""
        self.buffered: bytes | None = None if present else b""
        self._prefix = b""
        self.received = 0
        self.started = False
        self.held = 0
        """Bytes of this body counted against the shared `BufferBudget`."""
        self._budget: BufferBudget | None = None
        if not present:
            self.done.set()

    @property
    def replayable(self) -> bool:
        return self.buffered is not None or not self.started

    async def buffer_up_to(self, limit: int, budget: BufferBudget) -> None:
        """Read the body into memory if it fits in `limit` bytes and in the shared budget;
        otherwise keep what was read as a prefix of the stream."""
        if self.buffered is not None:
            return
        if self.content_length is not None and self.content_length > limit:
            return
        self._budget = budget
        chunks = bytearray()
        async for chunk in self._messages():
            chunks += chunk
            if len(chunks) > limit or not budget.take(len(chunk)):
                self._prefix = bytes(chunks)
                return
            self.held += len(chunk)
        self.buffered = bytes(chunks)

    def release(self) -> None:
        """Give the buffered bytes back to the shared budget (the request is over)."""
        if self._budget is not None and self.held:
            self._budget.give_back(self.held)
            self.held = 0

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

    def _read_deadline(self) -> tuple[float, str]:
        """When the next body message must have arrived, and which limit that is."""
        idle = trio.current_time() + self.idle_s
        if not self.min_rate:
            return idle, f"Client sent no body data for {self.idle_s:g}s"
        crawl = self.started_at + self.rate_grace_s + self.received / self.min_rate
        if crawl < idle:
            return crawl, (
                f"Client uploaded slower than server.body_min_rate_kb_s "
                f"({self.min_rate / 1024:g} KiB/s)"
            )
        return idle, f"Client sent no body data for {self.idle_s:g}s"

    async def _messages(self) -> AsyncIterator[bytes]:
        while not self.done.is_set():
            deadline, reason = self._read_deadline()
            with trio.move_on_at(deadline) as idle:
                message = await self._receive()
            if idle.cancelled_caught:
                raise ClientTooSlow(reason)
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
