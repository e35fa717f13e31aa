"""The ASGI entry point: inference goes to the streaming proxy, the rest to Quart.

Two fixes from shared/STACK_NOTES.md live here because they concern every response:
the last body message is sent in a shielded scope (otherwise quart-trio's cancellation races
hypercorn's keep-alive watcher and idle connections are never closed), and proxy routes are
plain ASGI so request bodies keep hypercorn's backpressure and no upstream response can be
orphaned between a view returning and its body being iterated.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import trio
from quart_trio import QuartTrio

from dsrouter import routes
from dsrouter.access import AccessLog, Receive, RequestRecord, Scope, Send
from dsrouter.app import admin_paths
from dsrouter.auth import PUBLIC_PATHS, Auth

if TYPE_CHECKING:
    from dsrouter.proxy import Proxy

ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def shield_final_send(send: Send) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return wrapped


async def send_json(
    send: Send, status: int, payload: object, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Frontend:
    """Dispatch, authentication and the draining switch, in front of Quart and the proxy.

    Every HTTP request passes here once, so this is where each gets its request id, its
    access line and its metrics (see `access.py`), and where in-flight requests are counted
    for the drain on shutdown.
    """

    OPEN_ADMIN_PATHS = frozenset({"/v1/models"})
    """Served by Quart but guarded like inference (API keys), not by the admin token."""

    def __init__(self, app: QuartTrio, proxy: Proxy, auth: Auth, access: AccessLog) -> None:
        self.app = app
        self.proxy = proxy
        self.auth = auth
        self.access = access
        self.exact, self.prefixes = admin_paths(app)
        self.draining = False
        self.in_flight = 0
        """Requests being served, not counting the 503s answered while draining."""
        self._idle = trio.Event()
        self._idle.set()

    def serves_admin(self, path: str) -> bool:
        return path in self.exact or path.startswith(self.prefixes)

    async def wait_idle(self) -> None:
        """Return once no request is in flight (the drain before shutdown)."""
        while self.in_flight:
            await self._idle.wait()

    def _allowed(self, path: str, admin: bool, authorization: bytes | None) -> bool:
        if path in PUBLIC_PATHS or (path == "/metrics" and not self.auth.protect_metrics):
            return True
        if admin and path not in self.OPEN_ADMIN_PATHS:
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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord.open(scope)
        send = record.wrap_send(shield_final_send(send))
        path = scope["path"]
        admin = self.serves_admin(path)
        try:
            if self.draining:
                if path == "/health":
                    await send_json(send, 503, {"status": "draining"})
                else:
                    await send_json(
                        send,
                        503,
                        {"error": "router is draining (shutting down)"},
                        [(b"retry-after", b"5")],
                    )
                return
            authorization = None
            for key, value in scope["headers"]:
                if key == b"authorization":
                    authorization = value
                    break
            if not self._allowed(path, admin, authorization):
                await send_json(
                    send,
                    401,
                    {"error": "missing or invalid bearer token"},
                    [(b"www-authenticate", b"Bearer")],
                )
                return
            if not self.in_flight:
                self._idle = trio.Event()
            self.in_flight += 1
            try:
                if admin:
                    await self.app(scope, record.wrap_receive(receive), send)
                else:
                    await self.proxy.handle(scope, receive, send, record)
            finally:
                self.in_flight -= 1
                if not self.in_flight:
                    self._idle.set()
        finally:
            self.access.finish(record, record.route or self._label(scope, admin))


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
