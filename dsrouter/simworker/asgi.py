"""Just enough raw ASGI for the simulated worker: requests, answers, and client departures.

The simulator sits on the other end of every proxy test, so it must see the bytes exactly as
the router sent them (hence a SHA-256 of every request body, computed while streaming) and
must notice at once when the router drops a connection (hence `Request.watch_disconnect`).
A framework would hide both.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

import attrs
import trio

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_JSON_BODY = 256 * 1024 * 1024
SLEEPING = "Server is sleeping. Call resume_memory_occupation first."
"""The scheduler's refusal of a generation while the worker's memory is released."""


class ClientGone(Exception):
    """The peer closed the connection before we finished reading its request."""


@attrs.define(eq=False)
class Request:
    scope: Scope
    receive: Receive
    body_sha256: Any = attrs.Factory(hashlib.sha256)
    body_done: bool = False
    body_bytes: int = 0
    on_body_done: Callable[[], None] | None = None

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def path(self) -> str:
        return self.scope["path"]

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.scope.get("query_string", b"").decode("latin-1"))

    def header(self, name: str, default: str = "") -> str:
        wanted = name.lower().encode()
        for key, value in self.scope["headers"]:
            if key.lower() == wanted:
                return value.decode("latin-1")
        return default

    async def chunks(self) -> AsyncIterator[bytes]:
        """The request body as it arrives; raises `ClientGone` if the peer leaves."""
        while not self.body_done:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            self.body_sha256.update(chunk)
            self.body_bytes += len(chunk)
            self.body_done = not message.get("more_body", False)
            if self.body_done and self.on_body_done is not None:
                self.on_body_done()
            if chunk:
                yield chunk

    async def read(self, limit: int = MAX_JSON_BODY) -> bytes:
        parts = []
        size = 0
        async for chunk in self.chunks():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, {"detail": f"request body larger than {limit} bytes"})
            parts.append(chunk)
        return b"".join(parts)

    async def drain(self) -> None:
        async for _ in self.chunks():
            pass

    async def watch_disconnect(self, scope: trio.CancelScope) -> None:
        """Cancel `scope` when the peer goes away (call once the body has been read)."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return


@attrs.define
class Response:
    status: int
    body: bytes | Iterable[bytes] | AsyncIterator[bytes] = b""
    content_type: str | None = "application/json"
    headers: list[tuple[str, str]] = attrs.Factory(list)
    length: int | None = None


class HTTPError(Exception):
    """An error answer raised from deep inside a handler."""

    def __init__(self, status: int, body: Any, content_type: str = "application/json") -> None:
        super().__init__(status, body)
        self.response = (
            json_response(status, body)
            if content_type == "application/json"
            else Response(status, str(body).encode(), content_type)
        )


def json_response(
    status: int,
    payload: Any,
    headers: list[tuple[str, str]] | None = None,
) -> Response:
    return Response(status, json.dumps(payload).encode(), "application/json", headers or [])


def plain_500() -> Response:
    """What an uncaught exception in a FastAPI handler looks like to the client.

    uvicorn answers a plain-text 500 and then closes the connection, without saying so in
    a header (a client that reuses the connection gets a reset). hypercorn closes it here
    because of the `connection: close` header; the effect on a client is the same.
    """
    return Response(
        500, b"Internal Server Error", "text/plain; charset=utf-8", [("connection", "close")]
    )


class Uncaught(HTTPError):
    """An exception the real worker does not catch: the plain-text 500 of `plain_500`."""

    def __init__(self) -> None:
        Exception.__init__(self, 500)
        self.response = plain_500()


def missing_field(field: str, given: Any, where: str = "body") -> HTTPError:
    """FastAPI's 422 for a required field that is absent."""
    return HTTPError(
        422,
        {
            "detail": [
                {"type": "missing", "loc": [where, field], "msg": "Field required", "input": given}
            ]
        },
    )


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """Body of a route declared with a pydantic model: invalid JSON is FastAPI's 422."""
    try:
        value = json.loads(raw) if raw else None
    except RecursionError:  # nesting past Python's limit: uncaught in FastAPI too
        raise Uncaught from None
    except ValueError as exc:
        raise HTTPError(
            422,
            {
                "detail": [
                    {
                        "type": "json_invalid",
                        "loc": ["body", 0],
                        "msg": f"JSON decode error: {exc}",
                        "input": {},
                    }
                ]
            },
        ) from None
    if not isinstance(value, dict):
        raise HTTPError(
            422,
            {
                "detail": [
                    {
                        "type": "model_attributes_type",
                        "loc": ["body"],
                        "msg": "Input should be a valid dictionary",
                        "input": value,
                    }
                ]
            },
        )
    return value


async def send_response(
    send: Send,
    response: Response,
    extra: list[tuple[str, str]],
    drip_bps: int = 0,
    cut_after: int | None = None,
) -> None:
    """Send headers then body; `drip_bps` throttles it, `cut_after` aborts after N bytes."""
    headers = [(k.encode(), v.encode()) for k, v in [*response.headers, *extra]]
    if response.content_type:
        headers.append((b"content-type", response.content_type.encode()))
    body = response.body
    length = len(body) if isinstance(body, bytes) else response.length
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    await send({"type": "http.response.start", "status": response.status, "headers": headers})
    sent = 0
    async for chunk in _pieces(body, drip_bps):
        if cut_after is not None and sent + len(chunk) > cut_after:
            await send(
                {"type": "http.response.body", "body": chunk[: cut_after - sent], "more_body": True}
            )
            raise CutShort
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        sent += len(chunk)
        if drip_bps:
            await trio.sleep(len(chunk) / drip_bps)
    # Shielded (shared/STACK_NOTES.md section 2): sending the last message makes hypercorn
    # put `http.disconnect` to the app, which wakes `Request.watch_disconnect`, which cancels
    # the request while hypercorn, still inside this send, starts the connection's idle
    # watcher. Cancelled there, the watcher never runs: the idle connection is then closed
    # neither after `keep_alive_timeout` nor on SIGTERM, and shutdown waits out the whole
    # graceful timeout for it.
    with trio.CancelScope(shield=True):
        await send({"type": "http.response.body", "body": b"", "more_body": False})


class CutShort(Exception):
    """The body was deliberately cut (the `exit_after` fault)."""


async def _pieces(
    body: bytes | Iterable[bytes] | AsyncIterator[bytes], drip_bps: int
) -> AsyncIterator[bytes]:
    """The body in sends of at most 1 MiB, or ~1/20 s worth of bytes when dripping."""
    size = max(1024, min(64 * 1024, drip_bps // 20)) if drip_bps else 1 << 20
    async for chunk in _chunks(body):
        for start in range(0, len(chunk), size):
            yield chunk[start : start + size]


async def _chunks(body: bytes | Iterable[bytes] | AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if isinstance(body, bytes):
        yield body
    elif isinstance(body, AsyncIterator):
        async for chunk in body:
            yield chunk
    else:
        for chunk in body:
            yield chunk
