"""WebSocket sessions: one client, one worker, every message relayed both ways unchanged.

A worker serves one realtime session at a time (`WORKER_API.md` §12: a second is refused
with an error frame and close code 1008), so a session takes its worker's realtime slot in
the registry (`Registry.lease_session`) together with one unit of load, and holds both until
it ends. With no free worker the client gets the refusal a busy worker gives, at once
(`realtime.when_busy = "refuse"`) or after waiting up to `realtime.wait_s` for a slot.

What passes through, and what cannot (ASGI carries messages, not frames):
- Text and binary messages, unchanged, in order; close codes and reasons both ways
  (the client's reach us through `wire.py`). A worker that vanishes without a close
  frame (1006, which is never sent on the wire) closes the client with 1011 and a reason;
  a client that vanishes closes the worker with 1001. A close frame without a code (1005)
  is passed on as 1000 (ASGI's close always has a code).
- Fragmentation, ping/pong and compression (permessage-deflate) are per hop: hypercorn
  and trio-websocket each reassemble fragmented messages and answer pings on their own
  side, so a message fragmented by the client reaches the worker whole.
- Backpressure: hypercorn hands the client's messages over through a queue of
  `max_app_queue_size` (10) and trio-websocket reads one message ahead from the worker;
  each side sends only when the other's socket accepts, so a slow reader on one side
  stops the other side's reads. Memory per session is bounded by those queues times
  `realtime.max_message_mb` (a larger message closes the session with 1009).

A session ends when either side closes, when nothing was relayed for
`realtime.idle_timeout_s`, after `realtime.max_lifetime_s`, or when the router drains
(`close_all`, after `server.drain_timeout_s`): the last three close both sides with 1001.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import msgpack
import trio

from dsrouter.access import AccessLog, SessionRecord, printable, request_id_for
from dsrouter.asgi import Headers, Receive, Scope, Send, reject_websocket
from dsrouter.config import Config
from dsrouter.proxy import HOP_BY_HOP, accept_for
from dsrouter.registry import Registry, Worker
from dsrouter.units import MiB
from dsrouter.workers_http import (
    ConnectionClosed,
    ConnectionRejected,
    UpstreamError,
    WebSocketConnection,
    WorkerHTTP,
)

log = logging.getLogger("dsrouter.realtime")

REALTIME_VIDEO = "/v1/realtime_video/generate"
ACTION_PATHS = frozenset({"/v1/actions/realtime", "/openpi/policy"})

NORMAL = 1000
GOING_AWAY = 1001
NO_STATUS = 1005
ABNORMAL = 1006
POLICY = 1008
INTERNAL_ERROR = 1011
CLOSE_S = 2.0
"""How long the closing messages to both sides may take once a session has ended."""
REASON_BYTES = 123
"""A close frame's reason fits in 125 bytes with its code."""
DROPPED_HEADERS = HOP_BY_HOP | {
    b"content-length",
    b"x-request-id",
    b"sec-websocket-key",
    b"sec-websocket-version",
    b"sec-websocket-extensions",
    b"sec-websocket-protocol",
    b"sec-websocket-accept",
}
"""The handshake is per hop: trio-websocket writes its own key, version and subprotocols."""


def _makes_actions(worker: Worker) -> bool:
    """Action routes are mounted only on VLA-action pipelines (`WORKER_API.md` §11)."""
    caps = worker.capabilities
    return "ACTION" in caps.output_types or "VLA_ACTION" in caps.task_types


def accept_for_path(path: str) -> Callable[[Worker], bool] | None:
    """Which workers may serve a WebSocket path: video-capable ones for realtime video,
    action pipelines for the action loops, any routable worker for other paths."""
    if path == REALTIME_VIDEO:
        return accept_for("VIDEO")
    if path in ACTION_PATHS:
        return _makes_actions
    return None


def route_label(path: str) -> str:
    return path if path == REALTIME_VIDEO or path in ACTION_PATHS else "other"


def refusal_frame(path: str, message: str) -> bytes:
    """The error message a worker sends on this path (msgpack): the realtime video shape,
    or the action loops' `{"error": ...}`."""
    if path in ACTION_PATHS:
        return msgpack.packb({"error": message})
    return msgpack.packb({"type": "error", "content": message})


@attrs.define(eq=False)
class _Ending:
    """How a session ended: what each side still has to be told (None: nothing, it
    closed itself)."""

    to_client: tuple[int, str] | None
    to_worker: tuple[int, str] | None


@attrs.define(eq=False)
class _Session:
    record: SessionRecord
    idle: trio.CancelScope
    """Its deadline moves with every message; `close_all` cancels it too."""
    ending: _Ending | None = None
    drained: bool = False


class Realtime:
    """Serves every WebSocket upgrade the frontend lets through (auth and drain are
    checked there) and keeps the open sessions for the drain."""

    def __init__(
        self,
        registry: Registry,
        workers: WorkerHTTP,
        access: AccessLog,
        config: Callable[[], Config],
    ) -> None:
        self.registry = registry
        self.workers = workers
        self.access = access
        self._config = config
        """Read at use, so a reload changes the limits for the next session."""
        self._sessions: set[_Session] = set()

    @property
    def open_sessions(self) -> int:
        return len(self._sessions)

    def close_all(self) -> None:
        """The drain is over: every open session closes with 1001 (both sides)."""
        for session in self._sessions:
            session.drained = True
            session.idle.cancel()

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one upgrade, from `websocket.connect` to the last close; one access line."""
        path = scope["path"]
        record = SessionRecord(printable(path), request_id_for(scope), route_label(path))
        try:
            if (await receive())["type"] == "websocket.connect":
                await self._serve(scope, receive, send, record)
        finally:
            self.access.finish_session(record)

    async def _serve(
        self, scope: Scope, receive: Receive, send: Send, record: SessionRecord
    ) -> None:
        config = self._config()
        settings = config.realtime
        path = scope["path"]
        wait_s = settings.wait_s if settings.when_busy == "wait" else 0.0
        with self.access.metrics.upgrades_waiting.track_inprogress():
            lease = await self.registry.lease_session(accept_for_path(path), wait_s)
        if lease is None:
            await self._refuse(path, send, record, self._why_none(path))
            return
        with lease:
            worker = lease.worker
            record.worker = worker.display_id
            headers = self._forward_headers(scope, config, record.request_id)
            target = (scope.get("raw_path") or path.encode()).decode("latin-1")
            if scope["query_string"]:
                target += "?" + scope["query_string"].decode("latin-1")
            try:
                async with self.workers.websocket(
                    worker.url,
                    target,
                    headers,
                    api_key=worker.api_key,
                    subprotocols=list(scope.get("subprotocols") or []),
                    max_message_bytes=settings.max_message_mb * MiB,
                ) as upstream:
                    await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
                    record.status = 101
                    await self._relay(receive, send, upstream, record)
            except ConnectionRejected as exc:
                await self._pass_rejection(send, record, exc)
            except UpstreamError as exc:
                self.registry.record_result(worker, False, str(exc))
                log.warning(
                    "WebSocket %s: worker %s unreachable: %s [%s]",
                    record.path,
                    worker.display_id,
                    exc,
                    record.request_id,
                )
                record.status = 502
                await reject_websocket(send, 502, f"worker unreachable: {exc}")

    def _why_none(self, path: str) -> str:
        accept = accept_for_path(path)
        if not self.registry.routable(accept):
            return "no healthy worker can serve this route"
        return "another realtime session is already active on every worker"

    async def _refuse(self, path: str, send: Send, record: SessionRecord, message: str) -> None:
        """What a busy worker does: accept, one error message, close 1008."""
        log.info("WebSocket %s refused: %s [%s]", record.path, message, record.request_id)
        await send({"type": "websocket.accept"})
        record.status = 101
        frame = refusal_frame(path, message)
        await send({"type": "websocket.send", "bytes": frame})
        record.frames_out, record.bytes_out = 1, len(frame)
        await send({"type": "websocket.close", "code": POLICY, "reason": message})
        record.close_code, record.close_reason = POLICY, message

    async def _pass_rejection(
        self, send: Send, record: SessionRecord, exc: ConnectionRejected
    ) -> None:
        """The worker answered the upgrade with HTTP (no such route, 403...): so does the
        router, with the worker's status, content type and body."""
        kept = [(k, v) for k, v in exc.headers or () if k.lower() == b"content-type"]
        body = exc.body or b""
        record.status = exc.status_code
        await send(
            {
                "type": "websocket.http.response.start",
                "status": exc.status_code,
                "headers": [*kept, (b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})

    def _forward_headers(self, scope: Scope, config: Config, request_id: str) -> Headers:
        named = set(DROPPED_HEADERS)
        if not config.security.forward_authorization:
            named.add(b"authorization")
        for key, value in scope["headers"]:
            if key.lower() == b"connection":
                named.update(v.strip().lower() for v in value.split(b","))
        kept = [(k, v) for k, v in scope["headers"] if k.lower() not in named]
        return [*kept, (b"x-request-id", request_id.encode())]

    async def _relay(
        self, receive: Receive, send: Send, upstream: WebSocketConnection, record: SessionRecord
    ) -> None:
        settings = self._config().realtime
        now = trio.current_time()
        session = _Session(record, trio.CancelScope(deadline=now + settings.idle_timeout_s))
        self._sessions.add(session)
        try:
            with trio.move_on_after(settings.max_lifetime_s) as lifetime, session.idle:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        self._client_to_worker, receive, upstream, session, settings.idle_timeout_s
                    )
                    nursery.start_soon(
                        self._worker_to_client, upstream, send, session, settings.idle_timeout_s
                    )
            ending = session.ending
            if ending is None:
                if session.drained:
                    reason = "router is shutting down"
                elif lifetime.cancelled_caught:
                    reason = (
                        f"session reached realtime.max_lifetime_s ({settings.max_lifetime_s:g} s)"
                    )
                else:
                    reason = f"idle for realtime.idle_timeout_s ({settings.idle_timeout_s:g} s)"
                ending = _Ending((GOING_AWAY, reason), (GOING_AWAY, reason))
            with trio.move_on_after(CLOSE_S) as closing:
                closing.shield = True
                if ending.to_client is not None:
                    code, reason = ending.to_client
                    await send({"type": "websocket.close", "code": code, "reason": reason})
                    record.close_code, record.close_reason = code, reason
                if ending.to_worker is not None:
                    await upstream.aclose(*ending.to_worker)
        finally:
            self._sessions.discard(session)

    async def _client_to_worker(
        self, receive: Receive, upstream: WebSocketConnection, session: _Session, idle_s: float
    ) -> None:
        record = session.record
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code", NORMAL)
                reason = message.get("reason") or ""
                record.close_code, record.close_reason = code, reason
                # 1006 says the client vanished; it is never sent in a close frame.
                to_worker = (GOING_AWAY, "client went away") if code == ABNORMAL else (code, reason)
                session.ending = session.ending or _Ending(None, to_worker)
                session.idle.cancel()
                return
            data = message.get("bytes")
            if data is None:
                data = message.get("text") or ""
                record.bytes_in += len(data.encode())
            else:
                record.bytes_in += len(data)
            record.frames_in += 1
            session.idle.deadline = trio.current_time() + idle_s
            try:
                await upstream.send_message(data)
            except ConnectionClosed:
                return  # the worker closed: `_worker_to_client` reads why and ends the session

    async def _worker_to_client(
        self, upstream: WebSocketConnection, send: Send, session: _Session, idle_s: float
    ) -> None:
        record = session.record
        while True:
            try:
                data = await upstream.get_message()
            except ConnectionClosed as closed:
                code = closed.reason.code if closed.reason is not None else ABNORMAL
                reason = (closed.reason.reason if closed.reason is not None else None) or ""
                if code == ABNORMAL:
                    code, reason = INTERNAL_ERROR, f"worker {record.worker} connection lost"
                    log.warning("WebSocket %s: %s [%s]", record.path, reason, record.request_id)
                session.ending = session.ending or _Ending((code, _fit(reason)), None)
                session.idle.cancel()
                return
            record.frames_out += 1
            if isinstance(data, bytes):
                record.bytes_out += len(data)
                await send({"type": "websocket.send", "bytes": data})
            else:
                record.bytes_out += len(data.encode())
                await send({"type": "websocket.send", "text": data})
            session.idle.deadline = trio.current_time() + idle_s


def _fit(reason: str) -> str:
    """A reason that fits a close frame (UTF-8, cut on a character boundary)."""
    encoded = reason.encode()
    if len(encoded) <= REASON_BYTES:
        return reason
    return encoded[:REASON_BYTES].decode(errors="ignore")
