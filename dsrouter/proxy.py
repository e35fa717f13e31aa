"""The streaming forwarder for every inference route: a plain ASGI app.

Request bodies flow from hypercorn's `receive()` straight into the upstream request, so the
client is paused when the worker reads slowly (Quart would buffer the whole upload); response
bodies flow back chunk by chunk with `aiter_raw`, never decoded. The only bodies the router
reads are small JSON answers it must learn from (job ids, job status, list pages).

Lifetimes: a request holds one registry `Lease` from dispatch until its last byte is sent or
it fails; a watcher turns the client's disconnect into cancellation of the whole exchange, so
the upstream request is closed at once and the lease released exactly once.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import httpx
import trio

from dsrouter import routes
from dsrouter.context import RouterContext
from dsrouter.frontend import Receive, Scope, Send
from dsrouter.listing import merged_job_list
from dsrouter.registry import NoWorkerAvailable, Worker
from dsrouter.routes import Route

log = logging.getLogger("dsrouter.proxy")

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"remote-addr",
})
PEEK_LIMIT = 1024 * 1024
"""Largest answer the router reads to learn a job id or status; bigger ones just stream."""
BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


class ClientDisconnected(Exception):
    """The client went away while the router was still reading its request."""


class UpstreamFailed(Exception):
    """The worker could not be reached or broke the exchange before answering."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@attrs.define
class Exchange:
    """One client request as it passes through the proxy."""

    scope: Scope
    receive: Receive
    send: Send
    request_id: str
    route: Route
    body_done: trio.Event = attrs.Factory(trio.Event)
    response_started: bool = False

    @property
    def method(self) -> str:
        return self.scope["method"]

    def has_body(self) -> bool:
        if self.method not in BODYLESS_METHODS:
            return True
        return any(k in (b"content-length", b"transfer-encoding")
                   for k, _ in self.scope["headers"])

    async def body(self) -> AsyncIterator[bytes]:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnected
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                self.body_done.set()
                return

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]],
                      body: bytes = b"", more: bool = False) -> None:
        headers = [*headers, (b"x-request-id", self.request_id.encode())]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        self.response_started = True
        await self.send({"type": "http.response.body", "body": body, "more_body": more})

    async def respond_json(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        await self.respond(status, [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())], body)

    async def respond_error(self, status: int, message: str, **extra: Any) -> None:
        log.log(logging.WARNING if status >= 500 else logging.INFO,
                "%s %s -> %d: %s [%s]", self.method, self.scope["path"], status, message,
                self.request_id)
        await self.respond_json(status, {"error": message, **extra})


def _accept(output: str | None) -> Callable[[Worker], bool] | None:
    """Which workers can produce `output`; unknown capabilities count as image-capable."""
    if output == "IMAGE":
        return lambda w: not w.capabilities.output_types or "IMAGE" in w.capabilities.output_types
    if output == "VIDEO":
        return lambda w: w.video_support is True
    if output == "MESH":
        return lambda w: "MESH" in w.capabilities.output_types
    return None


def job_id_from(payload: Any) -> str | None:
    """The id in a create answer: `id`, `video_id` or `job_id`, also inside `data[0]`."""
    for source in (payload, *(payload.get("data") or [])[:1]) if isinstance(payload, dict) else ():
        if isinstance(source, dict):
            for key in ("id", "video_id", "job_id"):
                value = source.get(key)
                if isinstance(value, str) and value:
                    return value
    return None


class Proxy:
    def __init__(self, context: RouterContext, client: httpx.AsyncClient) -> None:
        self.context = context
        self.registry = context.registry
        self.client = client
        """The hot-path client; probes and broadcasts use `context.client`."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = _header(scope, b"x-request-id") or uuid.uuid4().hex
        route = routes.classify(scope["method"], scope["path"], scope["query_string"])
        exchange = Exchange(scope, receive, send, request_id, route)
        if not exchange.has_body():
            exchange.body_done.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, exchange, nursery.cancel_scope)
            try:
                await self._dispatch(exchange)
            except ClientDisconnected:
                log.info("client went away during upload [%s]", request_id)
            except NoWorkerAvailable as exc:
                await exchange.respond_error(503, str(exc))
            except UpstreamFailed as exc:
                if exchange.response_started:
                    log.warning("worker broke a response mid-stream: %s [%s]", exc, request_id)
                else:
                    await exchange.respond_error(exc.status, str(exc))
            nursery.cancel_scope.cancel()

    async def _watch_disconnect(self, exchange: Exchange, scope: trio.CancelScope) -> None:
        await exchange.body_done.wait()
        while True:
            message = await exchange.receive()
            if message["type"] == "http.disconnect":
                log.info("client disconnected [%s]", exchange.request_id)
                scope.cancel()
                return

    async def _dispatch(self, exchange: Exchange) -> None:
        route = exchange.route
        if route.kind == routes.STICKY:
            await self._sticky(exchange)
        elif route.kind == routes.LIST:
            await self._merged_list(exchange)
        else:
            accept = _accept(route.output)
            if route.output == "VIDEO" and not any(
                    w.video_support for w in self.registry.workers()):
                await exchange.respond_error(400, "No video-capable workers available")
                return
            with self.registry.lease(accept) as lease:
                await self._forward(exchange, lease.worker, learn=route.kind == routes.CREATE)

    async def _sticky(self, exchange: Exchange) -> None:
        route = exchange.route
        assert route.job_id is not None
        worker = await self._owner(route)
        if worker is None:
            noun = {"videos": "Video", "meshes": "Mesh", "images": "Image"}[route.job_kind or ""]
            await exchange.respond_error(404, f"{noun} not found: {route.job_id}")
            return
        with self.registry.lease_worker(worker):
            status = await self._forward(exchange, worker, learn=False,
                                         watch_status=not route.path.endswith("/content"))
        if exchange.method == "DELETE" and status == 200:
            self.registry.jobs.forget(route.job_id)

    async def _owner(self, route: Route) -> Worker | None:
        """The worker that owns the job: remembered, or found by asking the pool."""
        assert route.job_id is not None
        url = self.registry.jobs.owner(route.job_id)
        if url is not None:
            worker = self.registry.by_url(url)
            if worker is not None:
                return worker
            self.registry.jobs.forget(route.job_id)
        candidates = [w for w in self.registry.routable() if w.health.value == "healthy"]
        probe_path = (f"/v1/images/{route.job_id}/content" if route.job_kind == "images"
                      else f"/v1/{route.job_kind}/{route.job_id}")
        found: list[Worker] = []
        timeout = self.context.config.health.timeout_s

        async def ask(worker: Worker, cancel: trio.CancelScope) -> None:
            with trio.move_on_after(timeout):
                try:
                    async with self.context.client.stream(
                            "GET", worker.url + probe_path) as response:
                        if response.status_code == 200:
                            found.append(worker)
                            cancel.cancel()
                except httpx.HTTPError:
                    return

        async with trio.open_nursery() as nursery:
            for worker in candidates:
                nursery.start_soon(ask, worker, nursery.cancel_scope)
        if not found:
            return None
        self.registry.jobs.remember(route.job_id, found[0].url, route.job_kind or "")
        log.info("learned owner of %s %s: %s", route.job_kind, route.job_id, found[0].display_id)
        return found[0]

    async def _forward(self, exchange: Exchange, worker: Worker, *, learn: bool,
                       watch_status: bool = False) -> int:
        """Send the request to `worker` and stream its answer back; returns the status."""
        request = self._build_request(exchange, worker)
        timeout = self.context.config.server.request_timeout_s
        with trio.move_on_after(timeout) as deadline:
            try:
                response = await self.client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise UpstreamFailed(
                    502, f"Worker request failed: {exc!s} ({worker.url})") from None
            except httpx.HTTPError as exc:
                raise UpstreamFailed(
                    502, f"Worker request failed: {type(exc).__name__}: {exc} ({worker.url})"
                ) from None
        if deadline.cancelled_caught:
            raise UpstreamFailed(504, f"Worker did not answer within {timeout:g}s ({worker.url})")
        try:
            await self._relay(exchange, worker, response, learn or watch_status)
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()
        return response.status_code

    def _build_request(self, exchange: Exchange, worker: Worker) -> httpx.Request:
        scope = exchange.scope
        headers = _forward_headers(scope["headers"])
        headers.append((b"x-request-id", exchange.request_id.encode()))
        url = worker.url + exchange.route.path
        query = scope["query_string"]
        if query:
            url = f"{url}?{query.decode('latin-1')}"
        content = exchange.body() if exchange.has_body() else None
        return self.client.build_request(exchange.method, url, headers=headers, content=content)

    async def _relay(self, exchange: Exchange, worker: Worker, response: httpx.Response,
                     learn: bool) -> None:
        headers = [(k, v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
        headers.append((b"x-dsrouter-worker", worker.display_id.encode()))
        chunks = response.aiter_raw()
        peeked = b""
        if learn and response.status_code == 200 and _is_json(response):
            length = response.headers.get("content-length")
            if length is None or int(length) <= PEEK_LIMIT:
                peeked = await _read_up_to(chunks, PEEK_LIMIT)
                self._learn(exchange.route, worker, peeked)
        try:
            await exchange.respond(response.status_code, headers, peeked, more=True)
            async for chunk in chunks:
                await exchange.send({"type": "http.response.body", "body": chunk,
                                     "more_body": True})
        except httpx.HTTPError as exc:
            raise UpstreamFailed(502, f"Worker broke the response: {type(exc).__name__}: {exc}"
                                 ) from None
        await exchange.send({"type": "http.response.body", "body": b"", "more_body": False})

    def _learn(self, route: Route, worker: Worker, body: bytes) -> None:
        try:
            payload = json.loads(body)
        except ValueError:
            return
        job_id = route.job_id or job_id_from(payload)
        if job_id is None:
            return
        if route.kind == routes.CREATE:
            self.registry.jobs.remember(job_id, worker.url, route.job_kind or "")
        elif isinstance(payload, dict) and payload.get("status") in ("completed", "failed"):
            self.registry.jobs.mark_finished(job_id)

    async def _merged_list(self, exchange: Exchange) -> None:
        """`GET /v1/videos` (or meshes) without an id: every suitable worker's jobs, merged."""
        workers = self.registry.routable(_accept(exchange.route.output))
        if not workers:
            raise NoWorkerAvailable("No healthy workers available in the pool")
        status, payload = await merged_job_list(
            self.context.client, workers, exchange.route.path, exchange.scope["query_string"],
            self.context.config.server.request_timeout_s)
        for worker_url, job_id in payload.pop("_owners", []):
            self.registry.jobs.remember(job_id, worker_url, exchange.route.job_kind or "")
        await exchange.respond_json(status, payload)


async def _read_up_to(chunks: AsyncIterator[bytes], limit: int) -> bytes:
    buffer = bytearray()
    while len(buffer) < limit:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        buffer += chunk
    return bytes(buffer)


def _is_json(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("application/json")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _forward_headers(raw: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers, those the `Connection` header names, and the client's id."""
    named = {b"x-request-id"}
    for key, value in raw:
        if key.lower() == b"connection":
            named.update(v.strip().lower() for v in value.split(b","))
    return [(k, v) for k, v in raw if k.lower() not in HOP_BY_HOP and k.lower() not in named]
