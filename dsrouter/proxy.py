"""The streaming forwarder for every inference route: a plain ASGI app.

Request bodies flow from hypercorn's `receive()` straight into the upstream request (small
ones are buffered first so they can be replayed on another worker); response bodies flow back
chunk by chunk with `aiter_raw`, never decoded. The only answers the router reads are small
JSON ones it must learn from (job ids, job status, list pages).

Lifetimes: each attempt holds one registry `Lease` until its last byte is sent or it fails;
a watcher turns the client's disconnect into cancellation of the whole exchange, so the
upstream request is closed at once and the lease released exactly once.

Failover: an attempt that could not reach its worker, or got 503 from it, moves to another
worker while nothing has been sent to the client and the body can still be replayed. Every
outcome is also reported to the registry's circuit breaker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import attrs
import trio

from dsrouter import routes
from dsrouter.access import RequestRecord
from dsrouter.asgi import Receive, Scope, Send, json_answer
from dsrouter.body import (
    BodyTooLarge,
    BufferBudget,
    ClientDisconnected,
    ClientTooSlow,
    RequestBody,
)
from dsrouter.config import Config, TenantsConfig
from dsrouter.context import RouterContext
from dsrouter.cost import CostModel, read_fields
from dsrouter.jobs import JobAffinity
from dsrouter.registry import (
    ASLEEP_RETRY_AFTER_S,
    Health,
    NoWorkerAvailable,
    PoolAsleep,
    QueueFull,
    QueuePlace,
    QueueTimeout,
    Worker,
)
from dsrouter.routes import Route
from dsrouter.tenants import OverLimit, Quotas, Tenant
from dsrouter.tracing import RequestTrace
from dsrouter.units import KiB, MiB
from dsrouter.workers_http import InvalidRequest, UpstreamError, UpstreamResponse

log = logging.getLogger("dsrouter.proxy")

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"remote-addr",
        b"expect",
    }
)
RESPONSE_DROP = HOP_BY_HOP | {b"date", b"server"}
"""hypercorn writes its own Date and Server; the worker's would be duplicates."""
PEEK_LIMIT = MiB
"""Largest answer the router reads to learn a job id or status; bigger ones just stream."""
BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
ASLEEP_RETRY_AFTER = [(b"retry-after", str(ASLEEP_RETRY_AFTER_S).encode())]
CLOSE = [(b"connection", b"close")]
"""On answers given before the request body was read: the rest of it is still on the
connection, so hypercorn closes it, and the client must know not to reuse it."""
MAX_MODEL_FILTERS = 64
"""Worker filters kept per (output, model); see `Proxy._accept`."""
GATEWAY_FAILURES = frozenset({502, 503, 504})
"""Worker answers that count against it (passive health): it could not do the work."""


class TooBusy(Exception):
    """`server.max_connections` proxied requests are in flight already (429)."""


class UpstreamFailed(Exception):
    """The exchange with the worker failed; `status` is what the client gets."""

    def __init__(self, status: int, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@attrs.define
class Exchange:
    """One client request as it passes through the proxy."""

    scope: Scope
    send: Send
    record: RequestRecord
    """Request id, status, bytes and the worker, shared with the frontend's access line."""
    route: Route
    body: RequestBody
    headers: dict[bytes, bytes]
    """The client's headers by (lower-case) name, for the few the router reads."""
    tenant: Tenant
    response_started: bool = False
    suspects: list[tuple[Worker, str, str]] = attrs.Factory(list)
    """Failures of this request not yet charged to their workers: (worker, kind, error).
    See `Proxy._judge`."""
    trace: RequestTrace | None = None
    """Its spans while tracing is on; None (and never looked at further) when off."""

    @property
    def method(self) -> str:
        return self.scope["method"]

    @property
    def request_id(self) -> str:
        return self.record.request_id

    @property
    def attempts(self) -> int:
        return self.record.attempts

    async def respond(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b"", more: bool = False
    ) -> None:
        headers = [*headers, (b"x-dsrouter-attempts", str(self.record.attempts).encode())]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        self.response_started = True
        await self.send({"type": "http.response.body", "body": body, "more_body": more})

    async def respond_json(
        self, status: int, payload: Any, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        head, body = json_answer(payload, headers)
        await self.respond(status, head, body)

    async def respond_error(
        self, status: int, message: str, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        log.log(
            logging.WARNING if status >= 500 else logging.INFO,
            "%s %s -> %d: %s [%s]",
            self.method,
            self.scope["path"],
            status,
            message,
            self.request_id,
        )
        if not self.response_started:
            await self.respond_json(status, {"error": message}, headers)


def _makes_images(worker: Worker) -> bool:
    """Unknown capabilities count as image-capable (the predecessors' assumption)."""
    return not worker.capabilities.output_types or "IMAGE" in worker.capabilities.output_types


def _makes_videos(worker: Worker) -> bool:
    return worker.video_support is True


def _makes_meshes(worker: Worker) -> bool:
    return "MESH" in worker.capabilities.output_types


_ACCEPT = {"IMAGE": _makes_images, "VIDEO": _makes_videos, "MESH": _makes_meshes}
_JOB_OUTPUTS = frozenset({"VIDEO", "MESH"})


def accept_for(output: str | None) -> Callable[[Worker], bool] | None:
    """Which workers can produce `output`: one long-lived function per output kind, so the
    registry can cache the matching workers (see `Registry.routable`)."""
    return _ACCEPT.get(output or "")


class Proxy:
    def __init__(self, context: RouterContext) -> None:
        self.context = context
        self.registry = context.registry
        self.workers = context.workers
        self.jobs = JobAffinity(context.registry, context.workers)
        self.active = 0
        self.quotas = Quotas(trio.current_time)
        self.buffers = BufferBudget(lambda: self.config.server.max_buffered_mb * MiB)
        self._rng = random.Random()
        self._accepts: dict[tuple[str | None, str], Callable[[Worker], bool]] = {}

    @property
    def config(self) -> Config:
        """Read at use, so a reload takes effect for the next request."""
        return self.context.config

    async def handle(
        self, scope: Scope, receive: Receive, send: Send, record: RequestRecord, tenant: Tenant
    ) -> None:
        """Serve one inference request for `tenant` (as `Auth` identified its key); `send`
        already feeds `record` (see `access.py`)."""
        headers = dict(scope["headers"])
        route = routes.classify(scope["method"], scope["path"], scope["query_string"])
        record.route = routes.label(route)
        server = self.config.server
        length = headers.get(b"content-length")
        content_length = int(length) if length is not None and length.isdigit() else None
        present = scope["method"] not in BODYLESS_METHODS or (
            b"content-length" in headers or b"transfer-encoding" in headers
        )
        body = RequestBody(
            receive,
            present=present,
            content_length=content_length,
            max_bytes=server.max_body_mb * MiB,
            idle_s=server.body_idle_timeout_s,
            min_rate=server.body_min_rate_kb_s * KiB,
            rate_grace_s=server.body_rate_grace_s,
        )
        record.tenant = tenant.name
        exchange = Exchange(scope, send, record, route, body, headers, tenant)
        tracing = self.context.tracing
        if not tracing.enabled:
            await self._serve(exchange, receive, length, content_length)
            return
        trace = exchange.trace = tracing.request(
            scope["method"], scope["path"], record.route, headers, record
        )
        try:
            await self._serve(exchange, receive, length, content_length)
        finally:
            trace.finish(record, body.received)

    async def _serve(
        self,
        exchange: Exchange,
        receive: Receive,
        length: bytes | None,
        content_length: int | None,
    ) -> None:
        body, headers, record = exchange.body, exchange.headers, exchange.record
        if length is not None and b"transfer-encoding" in headers:
            # RFC 9112 6.3: a request with both is a smuggling attempt or a broken client;
            # which length the worker would believe is anyone's guess.
            await exchange.respond_error(
                400, "request has both Content-Length and Transfer-Encoding", CLOSE
            )
            return
        if content_length is not None and content_length > body.max_bytes:
            await exchange.respond_error(413, str(BodyTooLarge(body.max_bytes)), CLOSE)
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watch_disconnect, exchange, receive, nursery.cancel_scope)
                await self._handle(exchange)
                nursery.cancel_scope.cancel()
        finally:
            body.release()
            record.bytes_in = body.received
            self._judge(exchange)

    async def _handle(self, exchange: Exchange) -> None:
        try:
            await self._dispatch(exchange)
        except ClientDisconnected:
            log.info("client went away during upload [%s]", exchange.request_id)
        except (NoWorkerAvailable, QueueTimeout) as exc:
            await exchange.respond_error(503, str(exc))
        except PoolAsleep as exc:
            await exchange.respond_error(503, str(exc), ASLEEP_RETRY_AFTER)
        except OverLimit as exc:
            log.info("%s [%s]", exc, exchange.request_id)
            self.context.metrics.tenant_refused.labels(exc.tenant, exc.limit).inc()
            await exchange.respond_json(
                429,
                {"error": str(exc), "tenant": exc.tenant, "limit": exc.limit},
                [(b"retry-after", str(exc.retry_after).encode())],
            )
        except QueueFull as exc:
            await exchange.respond_error(429, str(exc), [(b"retry-after", b"1")])
        except BodyTooLarge as exc:
            await exchange.respond_error(413, str(exc), CLOSE)
        except ClientTooSlow as exc:
            await exchange.respond_error(408, str(exc), CLOSE)
        except TooBusy as exc:
            await exchange.respond_error(429, str(exc), [(b"retry-after", b"1")])
        except InvalidRequest as exc:
            await exchange.respond_error(400, str(exc), CLOSE)
        except UpstreamFailed as exc:
            if exchange.response_started:
                log.warning("worker broke a response mid-stream: %s [%s]", exc, exchange.request_id)
            else:
                await exchange.respond_error(exc.status, str(exc))

    async def _watch_disconnect(
        self, exchange: Exchange, receive: Receive, scope: trio.CancelScope
    ) -> None:
        await exchange.body.done.wait()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                if not exchange.record.finished:
                    log.info("client disconnected mid-request [%s]", exchange.request_id)
                    scope.cancel()
                return

    def _timeout(self, route: Route) -> float:
        """Seconds a worker may take to start answering, by route."""
        if route.job_kind in ("videos", "meshes"):
            return (
                self.config.timeouts.job_s
                if not route.path.endswith("/content")
                else self.config.timeouts.content_s
            )
        if route.kind == routes.STICKY:
            return self.config.timeouts.content_s
        return self.config.server.request_timeout_s

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        """One of `server.max_connections` concurrent proxied requests.

        Taken once the body is buffered, not when the request arrives: a client trickling
        its upload holds no slot, so a crowd of them cannot lock out everyone else.
        """
        limit = self.config.server.max_connections
        if self.active >= limit:
            raise TooBusy(f"Too many concurrent requests (limit {limit})")
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1

    async def _dispatch(self, exchange: Exchange) -> None:
        route = exchange.route
        body = exchange.body
        if route.kind in (routes.POOL, routes.CREATE) and body.present:
            retry_buffer = self.config.routing.retry_buffer_mb * MiB
            if retry_buffer:
                await body.buffer_up_to(retry_buffer, self.buffers)
        with self._slot():
            await self._route(exchange)

    async def _route(self, exchange: Exchange) -> None:
        route = exchange.route
        if route.kind == routes.STICKY:
            await self._sticky(exchange)
        elif route.output is not None and self._nobody_makes(route.output):
            # SEEDS.md: no video-capable worker at all is the client's problem (400), not a
            # pool outage (503); meshes, job lists and images follow the same rule (an
            # image request to video-only workers got their final 400 from sglang-d-router).
            await exchange.respond_error(
                400, f"No {route.output.lower()}-capable workers available"
            )
        elif route.kind == routes.LIST:
            await self._merged_list(exchange)
        else:
            await self._with_failover(exchange)

    def _nobody_makes(self, output: str) -> bool:
        """No registered worker, whatever its state, can make `output`. With no worker at
        all, a job route is still 400 (SEEDS.md) but an image route a 503, as before."""
        workers = self.registry.workers()
        if output not in _JOB_OUTPUTS and not workers:
            return False
        return not any(map(accept_for(output), workers))

    def _accept(self, output: str | None, model: str | None) -> Callable[[Worker], bool] | None:
        """Which workers may serve a request for `output` naming `model` (None: any model).

        One long-lived function per (output, model), like `accept_for`, so the registry can
        cache the matching workers; the map is emptied when it grows past the few models a
        pool serves (only models some worker serves get here).
        """
        by_output = accept_for(output)
        if model is None:
            return by_output
        accept = self._accepts.get((output, model))
        if accept is None:
            if len(self._accepts) >= MAX_MODEL_FILTERS:
                self._accepts.clear()

            def accept(worker: Worker) -> bool:
                return worker.capabilities.serves(model) and (
                    by_output is None or by_output(worker)
                )

            self._accepts[(output, model)] = accept
        return accept

    async def _with_failover(self, exchange: Exchange) -> None:
        """Admit the request within its tenant's limits, then try suitable workers one after
        another until one answers (not 503).

        Suitable: able to produce the route's output and, when the request names a `model`
        (a JSON field or a multipart text field the router could read), serving that model.
        Workers do not check `model` themselves, so this is the only place that does; a model
        no registered worker serves gets the 404 a worker's `/v1/models/{model}` gives, one
        whose workers cannot produce the route's output the 400 such a worker gives. With
        `routing.match_model = false` the field is not looked at (MIGRATING.md).
        """
        body = exchange.body
        route = exchange.route
        headers = exchange.headers
        fields = read_fields(body.buffered, headers.get(b"content-type", b"").decode("latin-1"))
        cost = CostModel(self.config.cost).from_params(
            fields, video=route.path.startswith("/v1/videos")
        )
        model = fields.get("model") if isinstance(fields.get("model"), str) else None
        model = (model or None) if self.config.routing.match_model else None
        workers = self.registry.workers()
        if model is not None and workers and not any(w.capabilities.serves(model) for w in workers):
            await exchange.respond_json(404, model_not_found(model))
            return
        accept = self._accept(route.output, model)
        if model is not None and route.output and accept and not any(map(accept, workers)):
            # What the model's own workers answer for an output their pipeline lacks.
            await exchange.respond_error(
                400, f"Model {model!r} does not support {route.output} output"
            )
            return
        tenants = self.config.tenants
        tenant = exchange.tenant
        place = _queue_place(tenant, headers.get(b"x-dsrouter-priority"), tenants)
        metrics = self.context.metrics
        with self.quotas.admit(tenant, cost, tenants.replicas):
            metrics.tenant_requests.labels(tenant.name).inc()
            await self._attempts(exchange, accept, cost, place)
            metrics.tenant_cost.labels(tenant.name).inc(cost)

    async def _attempts(
        self,
        exchange: Exchange,
        accept: Callable[[Worker], bool] | None,
        cost: float,
        place: QueuePlace,
    ) -> None:
        body = exchange.body
        route = exchange.route
        tried: list[Worker] = []
        last_error: UpstreamFailed | None = None
        max_attempts = self.config.routing.max_attempts
        learn = route.kind == routes.CREATE
        trace = exchange.trace
        while True:
            asked_at = trio.current_time()
            waiting_since = 0 if trace is None else trace.now_ns()
            try:
                lease = await self.registry.acquire(accept, tried, cost, place)
            except NoWorkerAvailable:
                if last_error is None:
                    raise
                raise last_error from None
            except QueueTimeout as exc:
                if trace is not None:
                    trace.queued(waiting_since, str(exc))
                raise
            if trace is not None and lease.queued:
                trace.queued(waiting_since)
            worker = lease.worker
            exchange.record.waited.append((worker.display_id, trio.current_time() - asked_at))
            self.context.metrics.tenant_queue_wait.labels(place.tenant).observe(
                trio.current_time() - asked_at
            )
            with lease:
                may_retry = (
                    body.replayable
                    and exchange.attempts + 1 < max_attempts
                    and len(self.registry.routable(accept)) > len(tried) + 1
                )
                try:
                    started = trio.current_time()
                    status = await self._attempt(exchange, worker, learn=learn, may_retry=may_retry)
                    if status == 200 and route.path in routes.SYNCHRONOUS_GENERATIONS:
                        self.registry.observe(worker, cost, started, trio.current_time())
                    return
                except UpstreamFailed as exc:
                    if not (
                        exc.retryable
                        and body.replayable
                        and not exchange.response_started
                        and exchange.attempts < max_attempts
                    ):
                        raise
                    last_error = exc
            tried.append(worker)
            exchange.record.retried_from.append(worker.display_id)
            log.info(
                "attempt %d on %s failed (%s); trying another worker [%s]",
                exchange.attempts,
                worker.display_id,
                last_error,
                exchange.request_id,
            )
            backoff = self.config.routing.retry_backoff_s * 2 ** (exchange.attempts - 1)
            await trio.sleep(backoff * self._rng.uniform(0.5, 1.5))

    async def _sticky(self, exchange: Exchange) -> None:
        route = exchange.route
        assert route.job_id is not None
        worker = await self.jobs.owner(
            route.job_kind or "", route.job_id, self.config.timeouts.discovery_s
        )
        if worker is None:
            noun = {"videos": "Video", "meshes": "Mesh", "images": "Image"}[route.job_kind or ""]
            await exchange.respond_error(404, f"{noun} not found: {route.job_id}")
            return
        if worker.health is Health.DEAD:
            # sglang-d-router's answer: only that worker has the job, and it is out.
            await exchange.respond_error(503, "Mapped worker is unavailable")
            return
        with self.registry.lease_worker(worker):
            status = await self._attempt(
                exchange, worker, learn=False, watch_status=not route.path.endswith("/content")
            )
        if exchange.method == "DELETE" and status == 200:
            self.jobs.forget(route.job_id)

    async def _attempt(
        self,
        exchange: Exchange,
        worker: Worker,
        *,
        learn: bool,
        watch_status: bool = False,
        may_retry: bool = False,
    ) -> int:
        """Send the request to `worker` and stream its answer back; returns the status.

        Passive health (Envoy's outlier detection, gateway-failure flavour): a worker is
        blamed for connect failures, resets, timeouts and 502/503/504, once per attempt. A
        connect failure is charged at once (no byte of the request was involved); the
        others wait in `exchange.suspects` until the request's outcome shows whose fault
        they were (`_judge`). A complete answer below 500 counts as a success; other 5xx
        (a plain-text 500 is how a worker says a generation failed, often for the
        request's own reasons) count as neither.
        """
        record = exchange.record
        record.attempts += 1
        record.worker = worker.display_id
        log.debug(
            "%s %s: attempt %d on %s [%s]",
            exchange.method,
            exchange.scope["path"],
            exchange.attempts,
            worker.display_id,
            exchange.request_id,
        )
        trace = exchange.trace
        if trace is None:
            return await self._forward(exchange, worker, learn, watch_status, may_retry)
        with trace.attempt(worker.url, worker.display_id, record.attempts):
            sent_before = record.bytes_out
            try:
                return await self._forward(exchange, worker, learn, watch_status, may_retry)
            finally:
                trace.sent(exchange.body.received, record.bytes_out - sent_before)

    async def _forward(
        self, exchange: Exchange, worker: Worker, learn: bool, watch_status: bool, may_retry: bool
    ) -> int:
        """The exchange with the worker of one attempt (see `_attempt`)."""
        timeout = self._timeout(exchange.route)
        response: UpstreamResponse | None = None
        with trio.move_on_after(timeout) as deadline:
            try:
                response = await self.workers.send(*self._request_parts(exchange, worker))
            except UpstreamError as exc:
                if exc.connect:
                    self.registry.record_result(worker, False, str(exc))
                else:
                    exchange.suspects.append((worker, "reset", str(exc)))
                raise UpstreamFailed(
                    502, f"Worker request failed: {exc} ({worker.url})", retryable=True
                ) from None
        if response is None:
            assert deadline.cancelled_caught
            exchange.suspects.append((worker, "timeout", f"no answer within {timeout:g}s"))
            raise UpstreamFailed(504, f"Worker did not answer within {timeout:g}s ({worker.url})")
        status = response.status_code
        if exchange.trace is not None:
            exchange.trace.answered(status)
        try:
            if status in GATEWAY_FAILURES:
                exchange.suspects.append((worker, f"status {status}", f"answered {status}"))
            else:
                self._acquit(exchange)
            if status == 503 and may_retry:
                raise UpstreamFailed(
                    503, f"Worker {worker.display_id} is unavailable (503)", retryable=True
                )
            await self._relay(exchange, worker, response, learn or watch_status)
        finally:
            await response.aclose()
        if status < 500:
            self.registry.record_result(worker, True)
        return status

    def _acquit(self, exchange: Exchange) -> None:
        """A worker answered this request: the ones that failed it before are to blame."""
        for worker, _, error in exchange.suspects:
            self.registry.record_result(worker, False, error)
        exchange.suspects.clear()

    def _judge(self, exchange: Exchange) -> None:
        """Charge the request's remaining failures once it is over.

        When two or more workers failed it the same way and none answered, the request is
        the likelier culprit (a body that crashes or stalls every worker): nobody is
        charged, so one client cannot take healthy workers out of rotation.
        """
        suspects = exchange.suspects
        if len(suspects) >= 2 and len({kind for _, kind, _ in suspects}) == 1:
            log.warning(
                "%d workers failed this request the same way (%s); not counted against them [%s]",
                len(suspects),
                suspects[0][1],
                exchange.request_id,
            )
            suspects.clear()
        self._acquit(exchange)

    def _request_parts(
        self, exchange: Exchange, worker: Worker
    ) -> tuple[str, str, str, list[tuple[bytes, bytes]], bytes | AsyncIterator[bytes] | None]:
        scope = exchange.scope
        forward_auth = self.config.security.forward_authorization
        headers = _forward_headers(scope["headers"], keep_authorization=forward_auth)
        if not forward_auth:
            headers.extend(self.workers.auth(worker.api_key))
        headers.append((b"x-request-id", exchange.request_id.encode()))
        if exchange.trace is not None:
            headers = exchange.trace.propagate(headers)
        content = exchange.body.content()
        if not isinstance(content, bytes | None) and exchange.body.content_length is not None:
            headers.append((b"content-length", b"%d" % exchange.body.content_length))
        target = scope.get("raw_path") or exchange.route.path.encode()
        if exchange.route.path != scope["path"]:
            target = exchange.route.path.encode()
        query = scope["query_string"]
        if query:
            target = target + b"?" + query
        return (
            exchange.method,
            worker.url,
            target.decode("latin-1"),
            headers,
            content,
        )

    async def _relay(
        self, exchange: Exchange, worker: Worker, response: UpstreamResponse, learn: bool
    ) -> None:
        headers = [(k, v) for k, v in response.headers if k not in RESPONSE_DROP]
        headers.append((b"x-dsrouter-worker", worker.display_id.encode()))
        chunks = response.aiter_raw()
        idle_s = self.config.timeouts.idle_read_s
        try:
            peeked = b""
            if learn and response.status_code == 200 and _is_json(response):
                length = response.header(b"content-length")
                if length is None or int(length) <= PEEK_LIMIT:
                    peeked = await _read_up_to(chunks, PEEK_LIMIT, idle_s)
                    self._learn(exchange.route, worker, peeked)
            await exchange.respond(response.status_code, headers, peeked, more=True)
            while True:
                with trio.fail_after(idle_s):
                    chunk = await anext(chunks, None)
                if chunk is None:
                    break
                await exchange.send(
                    {"type": "http.response.body", "body": chunk, "more_body": True}
                )
        except (UpstreamError, trio.TooSlowError) as exc:
            # One count per attempt: a worker that answered 5xx and then broke it is one
            # failure, not two.
            exchange.suspects[:] = [s for s in exchange.suspects if s[0] is not worker]
            exchange.suspects.append((worker, "broken", f"broke its answer: {exc}"))
            # Before the first byte reached the client (the answer was still being peeked
            # at), the request may go to another worker like any unanswered one.
            raise UpstreamFailed(
                502,
                f"Worker broke the response: {type(exc).__name__}: {exc}",
                retryable=not exchange.response_started,
            ) from None
        await exchange.send({"type": "http.response.body", "body": b"", "more_body": False})

    def _learn(self, route: Route, worker: Worker, body: bytes) -> None:
        try:
            payload = json.loads(body)
        except ValueError:
            return
        created = route.kind == routes.CREATE
        self.jobs.learn(route.job_id, created, payload, worker, route.job_kind or "")

    async def _merged_list(self, exchange: Exchange) -> None:
        """`GET /v1/videos` (or meshes) without an id: every suitable worker's jobs, merged."""
        workers = self.registry.routable(accept_for(exchange.route.output))
        if not workers:
            if self.registry.pool_sleeping:
                raise PoolAsleep("pool is asleep")
            raise NoWorkerAvailable("No healthy workers available in the pool")
        exchange.record.attempts = len(workers)
        status, payload = await self.jobs.merged_list(
            workers,
            exchange.route.path,
            exchange.scope["query_string"],
            exchange.route.job_kind or "",
            self.config.timeouts.discovery_s,
        )
        await exchange.respond_json(status, payload)


async def _read_up_to(chunks: AsyncIterator[bytes], limit: int, idle_s: float) -> bytes:
    buffer = bytearray()
    while len(buffer) < limit:
        with trio.fail_after(idle_s):
            chunk = await anext(chunks, None)
        if chunk is None:
            break
        buffer += chunk
    return bytes(buffer)


def model_not_found(model: str) -> dict[str, Any]:
    """The body a worker gives for a model it does not serve (OpenAI's shape)."""
    return {
        "error": {
            "message": f"The model '{model}' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def _queue_place(tenant: Tenant, header: bytes | None, tenants: TenantsConfig) -> QueuePlace:
    """Where the request waits: its tenant's class, or a lower class `x-dsrouter-priority`
    names. An integer there below 0 puts the request behind the rest of its class; nothing
    the header says raises a request above what its key grants."""
    value = (header or b"").decode("latin-1").strip()
    rank, priority = tenant.rank, 0
    if value in tenants.classes:
        rank = max(rank, tenants.classes.index(value))
    else:
        with contextlib.suppress(ValueError):
            priority = min(0, int(value))
    return QueuePlace(rank, priority, tenant.name, tenant.weight, tenants.aging_s)


def _is_json(response: UpstreamResponse) -> bool:
    return (response.header(b"content-type") or b"").startswith(b"application/json")


def _forward_headers(
    raw: list[tuple[bytes, bytes]], *, keep_authorization: bool
) -> list[tuple[bytes, bytes]]:
    """Drop hop-by-hop headers, those `Connection` names, the client's id and credentials,
    and the client's framing: the proxy frames the body it sends itself."""
    named = {b"x-request-id", b"content-length"}
    if not keep_authorization:
        named.add(b"authorization")
    for key, value in raw:
        if key.lower() == b"connection":
            named.update(v.strip().lower() for v in value.split(b","))
    return [(k, v) for k, v in raw if k.lower() not in HOP_BY_HOP and k.lower() not in named]
