"""ASGI types and the one writer of a JSON answer at the ASGI level (frontend, proxy)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]


def json_answer(payload: object, headers: Headers | None = None) -> tuple[Headers, bytes]:
    """Head and body of a JSON answer; errors the router makes are `{"error": "..."}`."""
    body = json.dumps(payload).encode()
    head = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(headers or []),
    ]
    return head, body


async def send_json(
    send: Send, status: int, payload: object, headers: Headers | None = None
) -> None:
    head, body = json_answer(payload, headers)
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def reject_websocket(send: Send, status: int, message: str) -> None:
    """Refuse a WebSocket upgrade with an HTTP answer and a JSON error (ASGI's
    `websocket.http.response` extension, which hypercorn supports)."""
    head, body = json_answer({"error": message})
    await send({"type": "websocket.http.response.start", "status": status, "headers": head})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
