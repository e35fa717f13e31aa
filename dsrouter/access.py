"""One record per HTTP request, whoever answers it: request id, access line and metrics.
(WebSocket sessions get one `SessionRecord` each, and their own line: `finish_session`.)

The frontend opens a `RequestRecord` for every request before it decides who answers (the
proxy, Quart, or the frontend itself with a 401 or a draining 503), so every request gets
exactly one `x-request-id`, one access line and one count in `dsrouter_requests_total`.
The proxy fills in what only it knows (worker, attempts, the route label); the record
watches the ASGI messages for status, bytes and time to first byte.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from typing import Any

import attrs
import trio

from dsrouter.asgi import Receive, Scope, Send
from dsrouter.config import LoggingConfig
from dsrouter.metrics import Metrics
from dsrouter.status import Activity

access_log = logging.getLogger("dsrouter.access")

_PREFIX = os.urandom(4).hex()
_CLIENT_ID = re.compile(rb"[\x21-\x7e]{1,128}")
_counter = iter(range(1, 1 << 62))


def printable(text: str) -> str:
    """`text` safe for one log line: control and other unprintable characters escaped.

    Request paths are percent-decoded, so a client can put a newline (`%0a`) in one and
    forge log lines; escaped, it shows as `\\n`.
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(
        c if c.isprintable() and c != "\\" else c.encode("unicode_escape").decode() for c in text
    )


def new_request_id() -> str:
    """Unique across processes (random prefix) and cheap (no syscall per request)."""
    return f"{_PREFIX}{next(_counter):012x}"


def request_id_for(scope: Scope) -> str:
    """The client's `x-request-id`, or a new one put in the scope's headers so that whoever
    serves the request sees the same id the client will get back.

    A client's id goes into logs, answers and requests to workers, so only a short token
    of visible ASCII is taken; anything else is replaced by one of ours.
    """
    headers = scope["headers"]
    for key, value in headers:
        if key == b"x-request-id":
            if _CLIENT_ID.fullmatch(value):
                return value.decode("ascii")
            break
    request_id = new_request_id()
    scope["headers"] = [
        *(h for h in headers if h[0] != b"x-request-id"),
        (b"x-request-id", request_id.encode()),
    ]
    return request_id


@attrs.define(eq=False)
class RequestRecord:
    method: str
    path: str
    request_id: str
    started_at: float = attrs.Factory(trio.current_time)
    route: str | None = None
    """Bounded-cardinality name for metrics; set by whoever classified the request."""
    status: int = 0
    first_byte_at: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    worker: str = "-"
    tenant: str = "-"
    """The tenant of the request's API key (inference requests)."""
    attempts: int = 0
    retried_from: list[str] = attrs.Factory(list)
    """The workers whose attempts failed and moved on (`dsrouter_retries_total{worker}`)."""
    waited: list[tuple[str, float]] = attrs.Factory(list)
    """(worker, seconds) for each lease: how long it took to get that worker."""
    finished: bool = False
    """The last body message was sent: a disconnect after this is not an abort."""

    @classmethod
    def open(cls, scope: Scope) -> RequestRecord:
        """A record for the request, with its id (`request_id_for`)."""
        request_id = request_id_for(scope)
        return cls(scope["method"], printable(scope["path"]), request_id)

    def wrap_send(self, send: Send) -> Send:
        """Observe status and bytes; stamp `x-request-id` on the response head."""
        own_id = (b"x-request-id", self.request_id.encode())

        async def wrapped(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                self.first_byte_at = trio.current_time()
                message["headers"] = [
                    *(h for h in message.get("headers", ()) if h[0].lower() != b"x-request-id"),
                    own_id,
                ]
            elif message["type"] == "http.response.body":
                self.bytes_out += len(message.get("body", b""))
                self.finished = not message.get("more_body", False)
            await send(message)

        return wrapped

    def wrap_receive(self, receive: Receive) -> Receive:
        """Count request body bytes (for handlers that do not count them themselves)."""

        async def wrapped() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                self.bytes_in += len(message.get("body", b""))
            return message

        return wrapped


class AccessLog:
    """Turns a finished `RequestRecord` into metrics and (unless excluded) an access line
    and a point of the status page's charts."""

    def __init__(
        self, metrics: Metrics, activity: Activity, config: Callable[[], LoggingConfig]
    ) -> None:
        self.metrics = metrics
        self.activity = activity
        self.config = config
        """Read at use, so a reload changes logging for the next request."""
        # Labelled children, looked up once: `labels()` takes a lock and builds a key on
        # every call, and these run on every request.
        self._counters: dict[tuple[str, str], Any] = {}
        self._histograms: dict[str, tuple[Any, Any]] = {}
        self._bytes_in = metrics.bytes.labels("in")
        self._bytes_out = metrics.bytes.labels("out")

    def finish(self, record: RequestRecord, route: str) -> None:
        metrics = self.metrics
        status = str(record.status) if record.status else "aborted"
        elapsed = trio.current_time() - record.started_at
        counter = self._counters.get((route, status))
        if counter is None:
            counter = self._counters[route, status] = metrics.requests.labels(route, status)
        counter.inc()
        histograms = self._histograms.get(route)
        if histograms is None:
            histograms = self._histograms[route] = (
                metrics.duration.labels(route),
                metrics.ttfb.labels(route),
            )
        histograms[0].observe(elapsed)
        if record.first_byte_at is not None:
            histograms[1].observe(record.first_byte_at - record.started_at)
        for worker in record.retried_from:
            metrics.retries.labels(worker).inc()
        for worker, seconds in record.waited:
            metrics.queue_wait.labels(worker).observe(seconds)
        if record.worker != "-":
            metrics.worker_requests.labels(record.worker, status).inc()
        self._bytes_in.inc(record.bytes_in)
        self._bytes_out.inc(record.bytes_out)
        config = self.config()
        if record.path in config.access_log_exclude:
            return
        self.activity.record(route, status, elapsed, record.worker, record.request_id)
        if not config.access_log:
            return
        fields = {
            "request_id": record.request_id,
            "method": record.method,
            "path": record.path,
            "route": route,
            "status": record.status or None,
            "worker": record.worker,
            "tenant": record.tenant,
            "attempts": record.attempts,
            "bytes_in": record.bytes_in,
            "bytes_out": record.bytes_out,
            "latency_ms": round(elapsed * 1000, 2),
            "ttfb_ms": None
            if record.first_byte_at is None
            else round((record.first_byte_at - record.started_at) * 1000, 2),
        }
        access_log.info(
            "%s %s %s %s worker=%s tenant=%s attempts=%d in=%d out=%d %.1fms",
            record.request_id,
            record.method,
            record.path,
            status,
            record.worker,
            record.tenant,
            record.attempts,
            record.bytes_in,
            record.bytes_out,
            elapsed * 1000,
            extra={"access": fields},
        )

    def finish_session(self, record: SessionRecord) -> None:
        """Metrics and the access line of a session that ended (one per session)."""
        metrics = self.metrics
        elapsed = trio.current_time() - record.started_at
        code = str(record.close_code) if record.close_code is not None else "none"
        metrics.sessions.labels(record.route, code).inc()
        metrics.session_duration.labels(record.route).observe(elapsed)
        metrics.frames.labels("in").inc(record.frames_in)
        metrics.frames.labels("out").inc(record.frames_out)
        metrics.bytes.labels("in").inc(record.bytes_in)
        metrics.bytes.labels("out").inc(record.bytes_out)
        config = self.config()
        if not config.access_log or record.path in config.access_log_exclude:
            return
        access_log.info(
            "%s WEBSOCKET %s %s worker=%s frames_in=%d frames_out=%d in=%d out=%d close=%s %.1fms",
            record.request_id,
            record.path,
            record.status or "aborted",
            record.worker,
            record.frames_in,
            record.frames_out,
            record.bytes_in,
            record.bytes_out,
            code,
            elapsed * 1000,
            extra={"access": _session_fields(record, elapsed)},
        )


@attrs.define(eq=False)
class SessionRecord:
    """One WebSocket session: filled by `realtime.py`, written once by
    `AccessLog.finish_session` however the session ends."""

    path: str
    request_id: str
    route: str
    """Bounded-cardinality name for metrics: a known realtime path or `other`."""
    started_at: float = attrs.Factory(trio.current_time)
    worker: str = "-"
    status: int = 0
    """The HTTP status of the upgrade: 101 when accepted, else the refusal's."""
    frames_in: int = 0
    """Messages from the client to the worker."""
    frames_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    close_code: int | None = None
    """The code the client was sent (or closed with); None if nobody closed cleanly."""
    close_reason: str = ""


def _session_fields(record: SessionRecord, elapsed: float) -> dict[str, Any]:
    return {
        "request_id": record.request_id,
        "method": "WEBSOCKET",
        "path": record.path,
        "route": record.route,
        "status": record.status or None,
        "worker": record.worker,
        "frames_in": record.frames_in,
        "frames_out": record.frames_out,
        "bytes_in": record.bytes_in,
        "bytes_out": record.bytes_out,
        "close_code": record.close_code,
        "close_reason": record.close_reason,
        "duration_ms": round(elapsed * 1000, 2),
    }
