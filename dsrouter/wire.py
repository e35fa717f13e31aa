"""Five changes to hypercorn's trio server (0.17-0.18), installed before serving.

HTTP/2 is off. hypercorn switches a cleartext connection to HTTP/2 on `Upgrade: h2c` or
on the prior-knowledge preface, and its HTTP/2 side leaves an app waiting for ever when
the client goes away before reading the answer (the stream's send buffer is never
released once the connection is closed): found by the hostile-request property test,
whose h2c upgrades left the router unable to stop. No client of this router needs
HTTP/2 (curl, the OpenAI SDK and trainers speak HTTP/1.1), so an `Upgrade: h2c` is
ignored, as RFC 9110 allows (the request is answered over HTTP/1.1), and the preface is
an ordinary malformed request (400).

Answers hypercorn makes by itself: h11 refuses some heads outright (a malformed request
line, an unknown transfer coding, a head over `h11_max_incomplete_size`), and hypercorn then
answers with an empty body: no JSON, no log line, and a 501 for an unknown transfer coding,
which makes a client's garbage look like a router fault. hypercorn has no hook for this
answer, so `install` replaces the method that writes it (`_send_error_response`): the
router's JSON error shape, a 4xx status (the request is at fault) and one log line.

Concurrent sends: trio allows one writer per socket and raises `BusyResourceError` in a
second one. hypercorn's connection task writes a `100 Continue` (for `Expect:
100-continue`) and its end-of-stream while the app's task may be writing its answer on the
same socket; the request then dies with a traceback and, with a drain, the router's stop
waits for it. Found by the hostile-request property test. Here a connection's h11 events
are serialised (a `100 Continue` that lost the race to a final answer is dropped: the
client no longer waits for it, and h11 would refuse it; a WebSocket's `101` always goes),
and the end-of-stream takes the server's own send lock.

A refused body wedges its connection: hypercorn hands request-body chunks to the app
through a queue of `max_app_queue_size` (10) entries and never closes it. When the app
answers without reading the body (a 400 for a bad target, a 401), a body of more than ten
chunks (chunked coding makes one per chunk) fills the queue; the connection's reader then
waits for ever, and so does the app's own end-of-stream, which queues a disconnect in the
same queue. The socket stays half-closed and hypercorn's shutdown waits on it: the router
never stops. Here the disconnect never blocks the app's send (it is queued from a task of
its own when the queue is full), the queue closes when the app returns, and what arrives
for it later is dropped.

A client's WebSocket close code is lost: hypercorn answers the client's close frame and
then tells the app `websocket.disconnect` with 1006 (abnormal), whatever code and reason
the client sent. The realtime proxy passes both on to the worker, so here the close frame's
code and reason are kept and given to the app (`reason` as in ASGI spec 2.3).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import h11
import trio
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.ws_stream import ASGIWebsocketState, FrameTooLargeError, WSStream
from hypercorn.trio import task_group
from hypercorn.trio.tcp_server import TCPServer
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping
from wsproto.frame_protocol import CloseReason

log = logging.getLogger("dsrouter.frontend")

_MESSAGES = {
    400: "malformed HTTP request",
    414: "request target too long",
    431: "request head too large",
}


async def _send_error_response(self: Any, status_code: int) -> None:
    status = status_code if status_code < 500 else 400
    message = _MESSAGES.get(status, "malformed HTTP request")
    if status_code >= 500:
        message = "unsupported HTTP framing (transfer coding)"
    body = json.dumps({"error": message}).encode()
    client = getattr(self, "client", None)
    log.info("refused a request head from %s -> %d: %s", client, status, message)
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", b"%d" % len(body)),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),
    ]
    await self._send_h11_event(h11.Response(status_code=status, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


_SEND = H11Protocol._send_h11_event
_LOCK = "_dsrouter_send_lock"


@contextlib.asynccontextmanager
async def _holding(lock: trio.Lock) -> AsyncIterator[None]:
    """`lock`, unless this task holds it already: hypercorn's error paths re-enter (a
    failed write handles `Closed`, which writes or closes again) and must not deadlock."""
    if lock.statistics().owner is trio.lowlevel.current_task():
        yield
        return
    async with lock:
        yield


async def _send_h11_event(self: Any, event: Any) -> None:
    lock = self.__dict__.get(_LOCK)
    if lock is None:
        lock = self.__dict__[_LOCK] = trio.Lock()
    async with _holding(lock):
        if (
            isinstance(event, h11.InformationalResponse)
            and event.status_code == 100
            and self.connection.our_state is not h11.SEND_RESPONSE
        ):
            return
        await _SEND(self, event)


async def _close(self: Any) -> None:
    async with _holding(self.send_lock):
        with contextlib.suppress(
            trio.BrokenResourceError,
            trio.BusyResourceError,
            trio.ClosedResourceError,
            AttributeError,  # an SSL stream has no send_eof
        ):
            await self.stream.send_eof()
    await self.stream.aclose()


async def _check_protocol(self: Any, event: h11.Request) -> None:
    """Never switch protocols (hypercorn's version raises to hand over to HTTP/2)."""


async def _spawn_app(self: Any, app: Any, config: Any, scope: Any, send: Any) -> Any:
    into_app, app_queue = trio.open_memory_channel[Any](config.max_app_queue_size)

    async def app_then_close(*args: Any) -> None:
        try:
            await app(*args)
        finally:
            app_queue.close()

    self._nursery.start_soon(
        task_group._handle,
        app_then_close,
        config,
        scope,
        app_queue.receive,
        send,
        trio.to_thread.run_sync,
        trio.from_thread.run,
    )

    async def queue(message: Any) -> None:
        with contextlib.suppress(trio.BrokenResourceError):  # the app has returned
            await into_app.send(message)

    async def put(message: Any) -> None:
        if message["type"] != "http.disconnect":
            await queue(message)
            return
        try:
            into_app.send_nowait(message)
        except trio.WouldBlock:
            self._nursery.start_soon(queue, message)
        except trio.BrokenResourceError:
            pass

    return put


_WS_HANDLE = WSStream.handle
_CLIENT_CLOSE = "_dsrouter_client_close"


async def _ws_handle_events(self: Any) -> None:
    """hypercorn's `WSStream._handle_events`, remembering the client's close frame."""
    for event in self.connection.events():
        if isinstance(event, Message):
            try:
                self.buffer.extend(event)
            except FrameTooLargeError:
                await self._send_wsproto_event(CloseConnection(code=CloseReason.MESSAGE_TOO_BIG))
                break
            if event.message_finished:
                await self.app_put(self.buffer.to_message())
                self.buffer.clear()
        elif isinstance(event, Ping):
            await self._send_wsproto_event(event.response())
        elif isinstance(event, CloseConnection):
            self.__dict__.setdefault(_CLIENT_CLOSE, (event.code, event.reason or ""))
            if self.connection.state == ConnectionState.REMOTE_CLOSING:
                await self._send_wsproto_event(event.response())
            await self.send(StreamClosed(stream_id=self.stream_id))


async def _ws_handle(self: Any, event: Any) -> None:
    """On the stream's end after a client's close frame: its code and reason to the app."""
    close = self.__dict__.get(_CLIENT_CLOSE)
    if (
        isinstance(event, StreamClosed)
        and close is not None
        and not self.closed
        and self.app_put is not None
        and self.state not in {ASGIWebsocketState.HTTPCLOSED, ASGIWebsocketState.CLOSED}
    ):
        self.closed = True
        code, reason = close
        await self.app_put({"type": "websocket.disconnect", "code": code, "reason": reason})
        return
    await _WS_HANDLE(self, event)


def install() -> None:
    """Idempotent; called once by the daemon before it serves."""
    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]
    H11Protocol._send_h11_event = _send_h11_event  # type: ignore[method-assign]
    TCPServer._close = _close  # type: ignore[method-assign]
    task_group.TaskGroup.spawn_app = _spawn_app  # type: ignore[method-assign]
    H11Protocol._check_protocol = _check_protocol  # type: ignore[method-assign]
    keep_websocket_close_codes()


def keep_websocket_close_codes() -> None:
    """Only the WebSocket close fix (the simulated worker's too: uvicorn, which real
    workers run on, tells the app the client's code and reason). Idempotent."""
    WSStream._handle_events = _ws_handle_events  # type: ignore[method-assign]
    WSStream.handle = _ws_handle  # type: ignore[method-assign]
