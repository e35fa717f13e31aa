"""The ASGI entry point: inference goes to the streaming proxy, the rest to Quart.

Two fixes from shared/STACK_NOTES.md live here because they concern every response:
the last body message is sent in a shielded scope (otherwise quart-trio's cancellation races
hypercorn's keep-alive watcher and idle connections are never closed), and proxy routes are
plain ASGI so request bodies keep hypercorn's backpressure and no upstream response can be
orphaned between a view returning and its body being iterated.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio
from quart_trio import QuartTrio

from dsrouter.app import admin_paths

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def shield_final_send(send: Send) -> Send:
    async def wrapped(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            with trio.CancelScope(shield=True):
                await send(message)
        else:
            await send(message)

    return wrapped


class Frontend:
    def __init__(self, app: QuartTrio, proxy: ASGIApp) -> None:
        self.app = app
        self.proxy = proxy
        self.exact, self.prefixes = admin_paths(app)

    def serves_admin(self, path: str) -> bool:
        return path in self.exact or path.startswith(self.prefixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        send = shield_final_send(send)
        if self.serves_admin(scope["path"]):
            await self.app(scope, receive, send)
        else:
            await self.proxy(scope, receive, send)
