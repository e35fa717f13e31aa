"""Tracing on: `Tracing` over the OpenTelemetry SDK (imported only when tracing is on).

The router keeps a `TracerProvider` of its own instead of installing a global one: an
embedded router (`embed.py`) must not take over its host program's tracing, and two
routers in one process (tests) must not share exporters.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind as OtelKind
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from dsrouter import __version__
from dsrouter.tracing import (
    TRACE_HEADERS,
    AttributeValue,
    RequestTrace,
    Span,
    SpanKind,
    Tracing,
    otlp_traces_url,
)

if TYPE_CHECKING:
    from dsrouter.access import RequestRecord
    from dsrouter.config import TracingConfig

_KINDS = {"internal": OtelKind.INTERNAL, "client": OtelKind.CLIENT, "server": OtelKind.SERVER}
_PROPAGATOR = TraceContextTextMapPropagator()


class OtelSpan(Span):
    __slots__ = ("span",)

    def __init__(self, span: trace.Span) -> None:
        self.span = span

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        self.span.set_attributes(attributes)

    def fail(self, message: str) -> None:
        self.span.set_status(Status(StatusCode.ERROR, message))


def _context_of(span: Span | None) -> otel_context.Context | None:
    """The parent context for a new span: `span`'s, or None (the current context)."""
    if isinstance(span, OtelSpan):
        return trace.set_span_in_context(span.span)
    return None


def _inject(span: trace.Span) -> list[tuple[bytes, bytes]]:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, trace.set_span_in_context(span))
    return [(name.encode(), value.encode("latin-1")) for name, value in carrier.items()]


def _extract(traceparent: str | None, tracestate: str | None) -> otel_context.Context:
    carrier = {"traceparent": traceparent or ""}
    if tracestate:
        carrier["tracestate"] = tracestate
    return _PROPAGATOR.extract(carrier) if traceparent else otel_context.Context()


class OtelTracing(Tracing):
    enabled = True

    def __init__(self, config: TracingConfig, exporter: SpanExporter | None = None) -> None:
        self.config = config
        self.provider = TracerProvider(
            resource=Resource.create(
                {"service.name": config.service_name, "service.version": __version__}
            ),
            sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        )
        if exporter is not None:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            self.provider.add_span_processor(
                BatchSpanProcessor(
                    OTLPSpanExporter(
                        endpoint=otlp_traces_url(config.endpoint),
                        headers=dict(config.headers),
                        timeout=config.timeout_s,
                    )
                )
            )
        self.tracer = self.provider.get_tracer("dsrouter", __version__)

    @contextmanager
    def span(
        self,
        name: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        *,
        parent: Span | None = None,
        kind: SpanKind = "internal",
    ) -> Iterator[Span]:
        span = self.tracer.start_span(
            name, _context_of(parent), kind=_KINDS[kind], attributes=attributes
        )
        wrapped = OtelSpan(span)
        # Current within this task only, for spans started here without a `parent`.
        with trace.use_span(span, end_on_exit=True, record_exception=False):
            try:
                yield wrapped
            except trio.Cancelled:
                wrapped.fail("cancelled")
                raise
            except BaseException as exc:
                wrapped.fail(f"{type(exc).__name__}: {exc}")
                raise

    @contextmanager
    def continue_trace(self, traceparent: str | None, tracestate: str | None) -> Iterator[None]:
        token = otel_context.attach(_extract(traceparent, tracestate))
        try:
            yield
        finally:
            otel_context.detach(token)

    def headers(self, span: Span) -> list[tuple[bytes, bytes]]:
        return _inject(span.span) if isinstance(span, OtelSpan) else []

    def request(
        self,
        method: str,
        path: str,
        route: str,
        headers: Mapping[bytes, bytes],
        record: RequestRecord,
    ) -> RequestTrace:
        parent = _extract(_latin1(headers.get(b"traceparent")), _latin1(headers.get(b"tracestate")))
        span = self.tracer.start_span(
            f"{method} {route}",
            parent,
            kind=OtelKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": path,
                "http.route": route,
                "dsrouter.request_id": record.request_id,
            },
        )
        return OtelRequestTrace(self.tracer, span)

    async def aclose(self) -> None:
        # The batch processor's thread posts what is left; bounded, since the collector
        # may be gone. Shielded: this runs while the router is being cancelled.
        with trio.CancelScope(shield=True), trio.move_on_after(self.config.timeout_s + 1.0):
            await trio.to_thread.run_sync(self.provider.shutdown, abandon_on_cancel=True)


class OtelRequestTrace(RequestTrace):
    """The server span of one proxied request and its current attempt."""

    __slots__ = ("_attempt", "server", "tracer")

    def __init__(self, tracer: trace.Tracer, server: trace.Span) -> None:
        self.tracer = tracer
        self.server = server
        self._attempt: trace.Span | None = None

    def now_ns(self) -> int:
        return time.time_ns()

    def queued(self, since_ns: int, error: str | None = None) -> None:
        span = self.tracer.start_span(
            "dsrouter.queue", trace.set_span_in_context(self.server), start_time=since_ns
        )
        end = time.time_ns()
        span.set_attribute("dsrouter.queue.wait_s", (end - since_ns) / 1e9)
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, error))
        span.end(end)

    @contextmanager
    def attempt(self, worker_url: str, worker_id: str, number: int) -> Iterator[None]:
        parts = urlsplit(worker_url)
        span = self.tracer.start_span(
            "dsrouter.attempt",
            trace.set_span_in_context(self.server),
            kind=OtelKind.CLIENT,
            attributes={
                "dsrouter.worker.url": worker_url,
                "dsrouter.worker.id": worker_id,
                "server.address": parts.hostname or "",
                "server.port": parts.port or 80,
                "dsrouter.attempt": number,
                "http.request.resend_count": number - 1,
            },
        )
        self._attempt = span
        try:
            yield
        except trio.Cancelled:
            span.set_status(Status(StatusCode.ERROR, "cancelled"))
            raise
        except BaseException as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc) or type(exc).__name__))
            raise
        finally:
            self._attempt = None
            span.end()

    def sent(self, request_bytes: int, response_bytes: int) -> None:
        """Bytes each way of the current attempt (request body, response body)."""
        if self._attempt is not None:
            self._attempt.set_attributes(
                {
                    "http.request.body.size": request_bytes,
                    "http.response.body.size": response_bytes,
                }
            )

    def answered(self, status: int) -> None:
        if self._attempt is not None:
            self._attempt.set_attribute("http.response.status_code", status)
            if status >= 500:
                self._attempt.set_status(Status(StatusCode.ERROR, f"worker answered {status}"))

    def propagate(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        kept = [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS]
        if self._attempt is not None:
            kept.extend(_inject(self._attempt))
        return kept

    def finish(self, record: RequestRecord, bytes_in: int) -> None:
        span = self.server
        attributes: dict[str, Any] = {
            "dsrouter.attempts": record.attempts,
            "dsrouter.tenant": record.tenant,
            "dsrouter.worker.id": record.worker,
            "http.request.body.size": bytes_in,
            "http.response.body.size": record.bytes_out,
        }
        if record.status:
            attributes["http.response.status_code"] = record.status
            if record.status >= 500:
                span.set_status(Status(StatusCode.ERROR, f"answered {record.status}"))
        else:
            span.set_status(Status(StatusCode.ERROR, "no answer (client gone)"))
        span.set_attributes(attributes)
        span.end()


def _latin1(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")
