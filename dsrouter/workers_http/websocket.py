"""WebSocket connections to workers, on trio-websocket (wsproto underneath).

A worker's realtime routes (`WORKER_API.md` §11-12) are WebSockets, which the h11 pools in
`pool.py` cannot carry. trio-websocket is the maintained trio client: it reads the socket
only while its message queue has room (`message_queue_size`), so a slow client of the
router holds the worker back instead of filling the router's memory, and it refuses a
message over `max_message_size` with close code 1009.
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import trio
from trio_websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    HandshakeError,
    WebSocketConnection,
    open_websocket,
)

from dsrouter.workers_http.pool import Headers, UpstreamError

__all__ = [
    "CloseReason",
    "ConnectionClosed",
    "ConnectionRejected",
    "WebSocketConnection",
    "close_socket",
    "connect",
]

QUEUE_MESSAGES = 1
"""Messages read ahead from the worker: one, so memory per session is one message."""
CLOSE_HANDSHAKE_S = 2.0
"""How long closing waits for the worker's close frame before the TCP connection goes."""


async def close_socket(connection: WebSocketConnection) -> None:
    """Close the TCP connection under a WebSocket that is over.

    trio-websocket's client (0.12) leaves its socket open when the server closes first
    (the worker ends a generation, refuses a session, dies): `aclose` returns early on a
    connection already closed, and only the garbage collector closes the file
    descriptor. `_close_stream` is its own idempotent way to close it. (A refused
    handshake, `ConnectionRejected`, has the same leak and no connection object to close:
    there it is the collector's job.)
    """
    await connection._close_stream()


@contextlib.asynccontextmanager
async def connect(
    url: str,
    target: str,
    headers: Headers,
    *,
    subprotocols: list[str],
    max_message_bytes: int,
    connect_timeout_s: float,
) -> AsyncIterator[WebSocketConnection]:
    """An open WebSocket to `url` (a worker's origin) at `target` (path and query).

    A worker that answers the upgrade with an HTTP status raises `ConnectionRejected`
    (status, headers and body kept for the client); one that cannot be reached, or does
    not finish the handshake in `connect_timeout_s`, raises `UpstreamError`. The caller
    closes the connection with its own code (`aclose`) before leaving; leaving without
    closing sends 1000.
    """
    parts = urlsplit(url)
    tls = parts.scheme == "https"
    host = parts.hostname or ""
    port = parts.port or (443 if tls else 80)
    entered = False
    try:
        async with open_websocket(
            host,
            port,
            target,
            use_ssl=ssl.create_default_context() if tls else False,
            subprotocols=subprotocols or None,
            extra_headers=headers,
            message_queue_size=QUEUE_MESSAGES,
            max_message_size=max_message_bytes,
            connect_timeout=connect_timeout_s,
            disconnect_timeout=CLOSE_HANDSHAKE_S,
        ) as connection:
            entered = True
            try:
                yield connection
            finally:
                with trio.CancelScope(shield=True):
                    await close_socket(connection)
    except ConnectionRejected:
        raise
    except (HandshakeError, OSError) as exc:
        if entered:
            raise
        raise UpstreamError(f"cannot open a WebSocket: {exc!r}", connect=True) from None
