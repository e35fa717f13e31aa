"""OpenTelemetry tracing, off unless `[tracing] endpoint` is set (or an exporter is given).

Off, this module is all there is: `Tracing` does nothing and nothing from OpenTelemetry is
imported, so a router without the `tracing` extra installed runs as before and the proxy's
hot path pays one attribute check (`Tracing.enabled`) per request. The client's
`traceparent` and `tracestate` then reach the worker untouched, like any other header.

On, `dsrouter.tracing.otel` (imported only then) records:

- `POST /v1/...` (server): one per proxied request, a child of the client's `traceparent`;
- `dsrouter.queue`: the wait in the router queue, when the request waited there;
- `dsrouter.attempt` (client): each try on a worker; the worker gets this span as its
  `traceparent`, in place of the client's;
- `dsrouter.refit`, `dsrouter.catch_up`: weight changes and their replay on a late worker;
- `dsrouter.broadcast` with one `dsrouter.control_call` (client) per worker.

Spans are parented explicitly (`parent=`), not through whatever context a task inherited:
trio copies the context when a task is spawned, so a long-lived task (the registry's,
the health checker's) would otherwise carry the context of whoever started it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dsrouter.access import RequestRecord
    from dsrouter.config import TracingConfig

AttributeValue = str | bool | int | float | Sequence[str]
SpanKind = Literal["internal", "client", "server"]
TRACE_HEADERS = (b"traceparent", b"tracestate")
"""The W3C Trace Context headers: a router that traces replaces them; one that does not
passes them on."""


class Span:
    """A span as dsrouter's code sees it; this base records nothing (tracing off, or a
    span the sampler dropped)."""

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        """Add attributes (OpenTelemetry's types: str, bool, int, float or lists of str)."""

    def fail(self, message: str) -> None:
        """Mark the span as failed, saying why."""


NULL_SPAN = Span()


class RequestTrace:
    """The spans of one proxied request (see `otel.OtelRequestTrace`); only exists while
    tracing is on, so the proxy asks `Exchange.trace is not None` and does nothing else."""

    def queued(self, since_ns: int, error: str | None = None) -> None:
        """Record the wait in the router queue from `since_ns` (`now_ns`) until now."""
        raise NotImplementedError

    def now_ns(self) -> int:
        """Wall-clock nanoseconds, as spans are stamped (for `queued`)."""
        raise NotImplementedError

    def attempt(self, worker_url: str, worker_id: str, number: int) -> Any:
        """Context manager: the span of try `number` (1-based) on a worker."""
        raise NotImplementedError

    def answered(self, status: int) -> None:
        """The current attempt's worker answered `status`."""
        raise NotImplementedError

    def sent(self, request_bytes: int, response_bytes: int) -> None:
        """Bytes each way of the current attempt (request body, response body)."""
        raise NotImplementedError

    def propagate(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """`headers` for the worker: the client's trace headers replaced by the attempt's."""
        raise NotImplementedError

    def finish(self, record: RequestRecord, bytes_in: int) -> None:
        """End the server span with what the request came to."""
        raise NotImplementedError


class Tracing:
    """Tracing off: every span is `NULL_SPAN` and no header is touched.

    `OtelTracing` (in `otel.py`) overrides every method; callers outside the proxy's hot
    path use these methods unconditionally, the proxy checks `enabled` first.
    """

    enabled = False

    @contextmanager
    def span(
        self,
        name: str,
        attributes: Mapping[str, AttributeValue] | None = None,
        *,
        parent: Span | None = None,
        kind: SpanKind = "internal",
    ) -> Iterator[Span]:
        """A span around the block, a child of `parent` (else of the trace
        `continue_trace` is in, else a new trace). An exception leaving the block marks it
        failed and goes on."""
        yield NULL_SPAN

    @contextmanager
    def continue_trace(self, traceparent: str | None, tracestate: str | None) -> Iterator[None]:
        """Within the block, spans without a `parent` continue the client's trace (the
        admin routes: a trainer's refit shows in the trainer's trace)."""
        yield

    def headers(self, span: Span) -> list[tuple[bytes, bytes]]:
        """`traceparent` (and `tracestate`) naming `span`, for a call to a worker."""
        return []

    def request(
        self,
        method: str,
        path: str,
        route: str,
        headers: Mapping[bytes, bytes],
        record: RequestRecord,
    ) -> RequestTrace:
        """Start the server span of a proxied request; only called when `enabled`."""
        raise NotImplementedError

    async def aclose(self) -> None:
        """Flush and stop the exporter (bounded by `tracing.timeout_s`)."""


def make_tracing(config: TracingConfig, exporter: Any = None) -> Tracing:
    """`Tracing` (off) without an endpoint or exporter; else the OpenTelemetry one.

    `exporter` is an OpenTelemetry `SpanExporter` that takes precedence over
    `config.endpoint` (embedding programs and tests); spans then go to it one by one as they
    end. Raises `TracingUnavailable` when the `tracing` extra is not installed.
    """
    if not config.endpoint and exporter is None:
        return Tracing()
    try:
        from dsrouter.tracing.otel import OtelTracing
    except ImportError as exc:
        raise TracingUnavailable(
            f"tracing.endpoint is set but OpenTelemetry is not installed ({exc.name} is "
            "missing): pip install 'dsrouter[tracing]'"
        ) from None
    return OtelTracing(config, exporter)


class TracingUnavailable(Exception):
    """`[tracing]` asks for tracing and the `tracing` extra is not installed."""


def available() -> bool:
    """Whether the `tracing` extra is installed, without importing it (for `check-config`)."""
    from importlib.util import find_spec

    return all(
        find_spec(name) is not None
        for name in (
            "opentelemetry.sdk",
            "opentelemetry.exporter.otlp.proto.http",
        )
    )


def otlp_traces_url(endpoint: str) -> str:
    """Where spans are posted: `endpoint/v1/traces` for a bare origin (the collector's
    base URL, as `OTEL_EXPORTER_OTLP_ENDPOINT` is read), else `endpoint` as written."""
    from urllib.parse import urlsplit

    path = urlsplit(endpoint).path
    return endpoint.rstrip("/") + "/v1/traces" if path in ("", "/") else endpoint
