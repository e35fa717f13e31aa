"""The ASGI entry point: inference goes to the streaming proxy, the rest to Quart.

Two fixes from shared/STACK_NOTES.md live here because they concern every response:
the last body message is sent in a shielded scope (otherwise quart-trio's cancellation races
hypercorn's keep-alive watcher and idle connections are never closed), and proxy routes are
plain ASGI so request bodies keep hypercorn's backpressure and no upstream response can be
orphaned between a view returning and its body being iterated.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import trio
from quart_trio import QuartTrio

from dsrouter import routes
from dsrouter.access import AccessLog, RequestRecord, printable
from dsrouter.app import admin_paths
from dsrouter.asgi import Headers, Receive, Scope, Send, reject_websocket, send_json
from dsrouter.auth import METRICS_PATHS, PUBLIC_PATHS, Auth
from dsrouter.config import Config
from dsrouter.events import EVENTS_LABEL, JobEvents, events_job
from dsrouter.target import BadTarget, check_target, is_worker_internal
from dsrouter.units import KiB

if TYPE_CHECKING:
    from dsrouter.proxy import Proxy
    from dsrouter.realtime import Realtime


log = logging.getLogger("dsrouter.frontend")

CLOSE: Headers = [(b"connection", b"close")]
"""On answers given before the request body was read: the rest of it is still on the
connection, so hypercorn closes it, and the client must know not to reuse it."""
DRAINING = {"error": "router is draining (shutting down)"}
UNAUTHORIZED = {"error": "missing or invalid bearer token"}
BUFFERS_FULL = {"error": "too many request bodies are buffered (server.max_buffered_mb)"}


def shield_final_send(send: Send) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return wrapped


class Frontend:
    """Dispatch, authentication and the draining switch, in front of Quart and the proxy.

    Every HTTP request passes here once, so this is where each gets its request id, its
    access line and its metrics (see `access.py`), where in-flight requests are counted for
    the drain on shutdown, and where malformed heads are refused before anyone reads them:
    an oversized head (431) and a request target the router and a worker could read
    differently (400, see `target.py`). WebSocket upgrades get the same checks and go to
    `Realtime`; `GET /v1/videos/{id}/events` goes to `JobEvents`.
    """

    OPEN_ADMIN_PATHS = frozenset({"/v1/models"})
    """Served by Quart but guarded like inference (API keys), not by the admin token; so is
    every `/v1/models/{model}`."""

    def __init__(
        self,
        app: QuartTrio,
        proxy: Proxy,
        auth: Auth,
        access: AccessLog,
        config: Callable[[], Config],
        realtime: Realtime,
        events: JobEvents,
    ) -> None:
        self.app = app
        self.proxy = proxy
        self.realtime = realtime
        self.events = events
        self.auth = auth
        self.access = access
        self._config = config
        """Read at use, so a reload changes the limits for the next request."""
        self.exact, self.prefixes = admin_paths(app)
        self.draining = False
        self.in_flight = 0
        """Requests and WebSocket sessions being served, not counting the 503s answered
        while draining."""
        self._idle = trio.Event()
        self._idle.set()

    def serves_admin(self, path: str) -> bool:
        return path in self.exact or path.startswith(self.prefixes)

    @contextlib.contextmanager
    def _serving(self) -> Iterator[None]:
        """Count a request or session in flight, for the drain on shutdown."""
        if not self.in_flight:
            self._idle = trio.Event()
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request is in flight (the drain before shutdown)."""
        while self.in_flight:
            await self._idle.wait()

    def _allowed(self, path: str, admin: bool, authorization: bytes | None) -> bool:
        if path in PUBLIC_PATHS or (path in METRICS_PATHS and not self.auth.protect_metrics):
            return True
        if admin and path not in self.OPEN_ADMIN_PATHS and not path.startswith("/v1/models/"):
            return self.auth.admin_allowed(authorization)
        return self.auth.inference_allowed(authorization)

    def _label(self, scope: Scope, admin: bool) -> str:
        """The metrics name of a request nobody classified (admin routes, early answers)."""
        path = scope["path"]
        if not admin:
            return routes.label(routes.classify(scope["method"], path, scope["query_string"]))
        if path in self.exact:
            return path
        prefix = next((p for p in self.prefixes if path.startswith(p)), "")
        return f"{prefix}{{id}}" if prefix else "other"

    def _refusal(self, scope: Scope) -> tuple[int, str, Headers] | None:
        """An oversized head: (status, message, headers), else None.

        hypercorn enforces `h11_max_incomplete_size` only while a head is incomplete, so a
        large head that arrives in one read passes it; this counts every head.
        """
        limit = self._config().server.max_header_kb * KiB
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        size += sum(len(key) + len(value) + 4 for key, value in scope["headers"])
        if size > limit:
            message = f"request head exceeds server.max_header_kb ({limit // 1024} KiB)"
            return 431, message, CLOSE
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        record = RequestRecord.open(scope)
        send = record.wrap_send(shield_final_send(send))
        admin = False
        try:
            refusal = self._refusal(scope)
            if refusal is None:
                try:
                    target = check_target(scope)
                except BadTarget as exc:
                    refusal = 400, str(exc), CLOSE
                else:
                    scope = target.scope
                    path = scope["path"]
                    admin = self.serves_admin(path)
                    refusal = None if admin else self._not_proxied(target.canonical)
            if refusal is not None:
                status, message, headers = refusal
                log.info(
                    "%s %s -> %d: %s [%s]",
                    scope["method"],
                    printable(scope["path"]),
                    status,
                    message,
                    record.request_id,
                )
                await send_json(send, status, {"error": message}, headers)
                return
            if self.draining and path != "/livez":
                if path == "/health":
                    await send_json(send, 503, {"status": "draining"})
                elif path == "/readyz":
                    await send_json(send, 503, {"status": "not ready", "reason": "draining"})
                else:
                    await send_json(send, 503, DRAINING, [(b"retry-after", b"5")])
                return
            tenant = None
            if admin or path in PUBLIC_PATHS:
                allowed = self._allowed(path, admin, _authorization(scope))
            else:
                tenant = self.auth.inference_tenant(_authorization(scope))
                allowed = tenant is not None
            if not allowed:
                headers = [(b"www-authenticate", b"Bearer"), *(CLOSE if _has_body(scope) else [])]
                await send_json(send, 401, UNAUTHORIZED, headers)
                return
            held = self._hold_admin_body(scope) if admin else 0
            if held is None:
                await send_json(send, 503, BUFFERS_FULL, [(b"retry-after", b"1"), *CLOSE])
                return
            try:
                with self._serving():
                    if admin:
                        await self.app(scope, record.wrap_receive(receive), send)
                    elif scope["method"] == "GET" and (job := events_job(path)) is not None:
                        record.route = EVENTS_LABEL
                        await self.events.handle(job, receive, send)
                    else:
                        assert tenant is not None
                        await self.proxy.handle(scope, receive, send, record, tenant)
            finally:
                self.proxy.buffers.give_back(held)
        finally:
            self.access.finish(record, record.route or self._label(scope, admin))

    def _not_proxied(self, canonical: str) -> tuple[int, str, Headers] | None:
        """Refuse to proxy a path a worker may read as one of the router's own routes.

        Quart matches the decoded path exactly; a worker (or a proxy in front of it) may
        merge slashes or drop a trailing one, so `//update_weights_from_disk` must not be
        forwarded where `/update_weights_from_disk` would need the admin token.
        """
        if is_worker_internal(canonical):
            return 404, f"{printable(canonical)} is a worker's own route", []
        if self.serves_admin(canonical):
            return 400, f"use {printable(canonical)} as written, without extra slashes", CLOSE
        return None

    def _hold_admin_body(self, scope: Scope) -> int | None:
        """Count the body Quart is about to buffer against `server.max_buffered_mb`.

        Quart reads an admin body whole (up to its route's limit: RL control bodies may be
        tens of MiB), so a burst of them must fit the same budget the proxy's replay
        buffers use. Returns the bytes held, or None when they do not fit.
        """
        if not _has_body(scope):
            return 0
        limit = self.app.config["DSROUTER_BODY_LIMIT"](scope["path"])
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        size = min(int(length), limit) if length is not None and length.isdigit() else limit
        return size if self.proxy.buffers.take(size) else None

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An upgrade gets the checks every request gets, then goes to `Realtime`.

        A refusal is an HTTP answer with a JSON body (ASGI's `websocket.http.response`
        extension, which hypercorn supports). The router's own routes serve no WebSocket.
        """
        refusal = self._refusal(scope)
        try:
            target = check_target(scope)
        except BadTarget as exc:
            refusal = refusal or (400, str(exc), [])
        else:
            path = target.scope["path"]
            admin = self.serves_admin(path)
            refusal = refusal or (None if admin else self._not_proxied(target.canonical))
            if refusal is None and self.draining:
                refusal = 503, DRAINING["error"], []
            elif refusal is None and not self._allowed(path, admin, _authorization(scope)):
                refusal = 401, UNAUTHORIZED["error"], []
            elif refusal is None and admin:
                refusal = 404, "no WebSocket route is served here", []
            if refusal is None:
                with self._serving():
                    await self.realtime.handle(target.scope, receive, send)
                return
        status, message, _ = refusal
        log.info("WebSocket %s -> %d: %s", printable(scope["path"]), status, message)
        await receive()  # websocket.connect
        await reject_websocket(send, status, message)


def _has_body(scope: Scope) -> bool:
    """The request announced a body (which nobody will read if the answer comes first)."""
    return any(
        key == b"transfer-encoding" or (key == b"content-length" and value.strip(b"0 "))
        for key, value in scope["headers"]
    )


def _authorization(scope: Scope) -> bytes | None:
    for key, value in scope["headers"]:
        if key == b"authorization":
            return value
    return None


class MetricsOnly:
    """The ASGI app of `server.metrics_port`: `/metrics` and nothing else.

    A scraper can then be given a port that reaches no worker management, RL control or
    inference route at all.
    """

    def __init__(self, render: Callable[[], bytes], frontend: Frontend) -> None:
        self.render = render
        self.frontend = frontend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        send = shield_final_send(send)
        if scope["path"] != "/metrics":
            await send_json(send, 404, {"error": "this port serves /metrics only"})
            return
        authorization = dict(scope["headers"]).get(b"authorization")
        auth = self.frontend.auth
        if auth.protect_metrics and not auth.admin_allowed(authorization):
            await send_json(
                send,
                401,
                {"error": "missing or invalid bearer token"},
                [(b"www-authenticate", b"Bearer")],
            )
            return
        body = self.render()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})
