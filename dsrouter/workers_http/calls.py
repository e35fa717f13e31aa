"""`WorkerHTTP`: every request the router makes to a worker, over one set of pools.

Proxied requests stream through `send` (the caller reads and closes the answer); the rest
are small exchanges read whole by `call` (control broadcasts, discovery, job lists,
capability probes), or reduced to a status (`status`, `probe`). All ride the same h11
keep-alive pools: one client, one place for the worker's credentials, and no second
connection pool per worker (httpx's cost several times the CPU per request; STACK_NOTES
§9).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, aclosing
from typing import Any
from urllib.parse import urlencode

import attrs
import trio

from dsrouter.units import MiB
from dsrouter.workers_http import websocket
from dsrouter.workers_http.pool import Headers, Upstream, UpstreamError, UpstreamResponse
from dsrouter.workers_http.readiness import HealthReading, read_health, unanswered
from dsrouter.workers_http.websocket import WebSocketConnection

ANSWER_LIMIT = 16 * MiB
"""Largest answer `call` reads whole (LoRA lists, checksums and job pages are far smaller);
a bigger one is an error, not a reason to hold unbounded memory."""
PROBE_BODY_LIMIT = 4096


@attrs.frozen
class Answer:
    """A worker's answer read whole, or why there is none (`status` None, `error` set)."""

    status: int | None
    body: bytes = b""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return json.loads(self.body)


class WorkerHTTP:
    def __init__(
        self, *, connect_timeout_s: float, worker_api_key: Callable[[], str] = lambda: ""
    ) -> None:
        """`worker_api_key` gives `security.worker_api_key` at each call, so a reload's
        key applies at once."""
        self._default_key = worker_api_key
        self.connect_timeout_s = connect_timeout_s
        self.pool = Upstream(connect_timeout_s=connect_timeout_s)

    def auth(self, api_key: str = "") -> Headers:
        """The credentials a worker gets: its own key, else `security.worker_api_key`."""
        key = api_key or self._default_key()
        return [(b"authorization", b"Bearer " + key.encode())] if key else []

    async def send(
        self,
        method: str,
        url: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Forward one request as given (the proxy has set credentials and framing);
        returns at the answer's head. The caller must `aclose()` the answer."""
        return await self.pool.send(method, url, target, headers, body)

    def websocket(
        self,
        url: str,
        target: str,
        headers: Headers,
        *,
        api_key: str = "",
        subprotocols: list[str],
        max_message_bytes: int,
    ) -> AbstractAsyncContextManager[WebSocketConnection]:
        """Open a WebSocket to a worker (`websocket.connect`) with the worker's credentials
        added to `headers` (which must carry none of the client's)."""
        return websocket.connect(
            url,
            target,
            [*headers, *self.auth(api_key)],
            subprotocols=subprotocols,
            max_message_bytes=max_message_bytes,
            connect_timeout_s=self.connect_timeout_s,
        )

    async def call(
        self,
        url: str,
        method: str,
        path: str,
        *,
        api_key: str = "",
        body: bytes | None = None,
        headers: Headers | None = None,
        params: dict[str, str] | None = None,
        timeout_s: float,
    ) -> Answer:
        """One exchange read whole, bounded by `timeout_s`; failures are an `Answer`."""
        target = f"{path}?{urlencode(params)}" if params else path
        extra: Headers = [(b"content-type", b"application/json")] if body is not None else []
        with trio.move_on_after(timeout_s):
            try:
                response = await self.pool.send(
                    method, url, target, [*extra, *(headers or []), *self.auth(api_key)], body
                )
                try:
                    content = await _read(response, ANSWER_LIMIT)
                finally:
                    await response.aclose()
            except UpstreamError as exc:
                return Answer(None, error=f"Worker request failed: {exc}")
            if content is None:
                return Answer(None, error=f"Worker answer exceeds {ANSWER_LIMIT // MiB} MiB")
            return Answer(response.status_code, content)
        return Answer(None, error=f"Worker request timed out after {timeout_s:g}s")

    async def status(self, url: str, path: str, *, api_key: str, timeout_s: float) -> int | None:
        """The status of `GET path` without reading the body (it may be a whole video)."""
        with trio.move_on_after(timeout_s):
            try:
                response = await self.pool.send("GET", url, path, self.auth(api_key), None)
            except UpstreamError:
                return None
            await response.aclose()
            return response.status_code
        return None

    async def probe(self, url: str, *, api_key: str, timeout_s: float) -> HealthReading:
        """`GET /health` once, classified (`readiness.read_health`)."""
        started = trio.current_time()
        with trio.move_on_after(timeout_s):
            try:
                response = await self.pool.send("GET", url, "/health", self.auth(api_key), None)
                try:
                    body = await _read(response, PROBE_BODY_LIMIT, cut=True)
                finally:
                    await response.aclose()
            except UpstreamError as exc:
                if exc.connect:
                    return unanswered(f"connect failed: {exc}", connect=True)
                return unanswered(f"probe failed: {exc}", connect=False)
            return read_health(response.status_code, body or b"", trio.current_time() - started)
        return unanswered(f"/health timed out after {timeout_s:g}s", connect=False)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep idle connections (see `Upstream.run`)."""
        await self.pool.run(task_status=task_status)

    def close_idle(self) -> None:
        self.pool.close_idle()


async def _read(response: UpstreamResponse, limit: int, *, cut: bool = False) -> bytes | None:
    """The body up to `limit` bytes: None beyond it, or the first `limit` with `cut`."""
    body = bytearray()
    async with aclosing(response.aiter_raw()) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) > limit:
                if cut:
                    return bytes(body[:limit])
                return None
    return bytes(body)
