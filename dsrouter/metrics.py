"""Prometheus metrics (`/metrics`), prefixed `dsrouter_` (plus the `process_` and
`python_` series of prometheus_client's own collectors).

Event counters and latency histograms are updated where the event happens (the access
record, the launcher). Per-worker state is not pushed on the hot path: a collector reads the
registry at scrape time. Every per-worker series carries a `worker` label (the worker's
`display_id`, `host:port`), so an alert can name the worker. Each router owns its own
`CollectorRegistry`, so several routers in one test process never share counters.

No `_created` series: they double the output and no alert uses them.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dsrouter import __version__
from dsrouter.registry import Registry

disable_created_metrics()

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1200,
    1800,
)
"""1 ms (router overhead) to 30 min (long generations)."""
LAUNCH_WEIGHTS = "launch"
"""The version label of a worker (or pool) on the weights it started with (no refit yet)."""
STATES = ("starting", "healthy", "stale", "dead", "sleeping", "draining")
"""Every value of `Worker.state`: exactly one is 1 for each worker."""


class _WorkerCollector(Collector):
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily(
            "dsrouter_worker_state", "1 for the worker's current state", labels=["worker", "state"]
        )
        in_flight = GaugeMetricFamily(
            "dsrouter_worker_in_flight", "Requests the worker is serving", labels=["worker"]
        )
        failures = GaugeMetricFamily(
            "dsrouter_worker_consecutive_failures",
            "Failed probes or requests in a row",
            labels=["worker"],
        )
        sessions = GaugeMetricFamily(
            "dsrouter_worker_realtime_sessions",
            "Open WebSocket sessions on the worker (at most one)",
            labels=["worker"],
        )
        speed = GaugeMetricFamily(
            "dsrouter_worker_seconds_per_unit",
            "Learned seconds per megapixel-step",
            labels=["worker"],
        )
        weights = GaugeMetricFamily(
            "dsrouter_worker_weight_version",
            'The weight version the worker last confirmed: 1, labelled by it ("launch": the '
            "weights it started with)",
            labels=["worker", "version"],
        )
        for worker in self.registry.workers():
            name = worker.display_id
            weights.add_metric([name, worker.weights or LAUNCH_WEIGHTS], 1.0)
            for candidate in STATES:
                state.add_metric([name, candidate], 1.0 if worker.state == candidate else 0.0)
            in_flight.add_metric([name], worker.in_flight)
            sessions.add_metric([name], worker.realtime_sessions)
            failures.add_metric([name], worker.consecutive_failures)
            if worker.speed.seconds_per_unit is not None:
                speed.add_metric([name], worker.speed.seconds_per_unit)
        summary = self.registry.summary()
        tenant_queued = GaugeMetricFamily(
            "dsrouter_tenant_queued", "Requests waiting in the router queue", labels=["tenant"]
        )
        for tenant, count in sorted(self.registry.queued_by_tenant().items()):
            tenant_queued.add_metric([tenant], count)
        pool_weights = GaugeMetricFamily(
            "dsrouter_pool_weight_version",
            "The weight version the pool is to serve (the last refit's): 1, labelled by it",
            labels=["version"],
        )
        pool_weights.add_metric([self.registry.target_version or LAUNCH_WEIGHTS], 1.0)
        queued = GaugeMetricFamily(
            "dsrouter_queued", "Requests waiting in the router queue", value=summary["queued"]
        )
        total = GaugeMetricFamily(
            "dsrouter_in_flight", "Requests being served by workers", value=summary["in_flight"]
        )
        probes = CounterMetricFamily(
            "dsrouter_probes", "Health probes by worker and outcome", labels=["worker", "outcome"]
        )
        for (worker_id, outcome), count in sorted(self.registry.probe_counts.items()):
            probes.add_metric([worker_id, outcome], count)
        failures_total = CounterMetricFamily(
            "dsrouter_worker_failures",
            "Failed probes and failed requests counted against the worker",
            labels=["worker", "source"],
        )
        for (worker_id, source), count in sorted(self.registry.failure_counts.items()):
            failures_total.add_metric([worker_id, source], count)
        transitions = CounterMetricFamily(
            "dsrouter_worker_transitions",
            "Worker health changes (quarantine = breaker open, recovery = closed)",
            labels=["to"],
        )
        for target, count in sorted(self.registry.transition_counts.items()):
            transitions.add_metric([target], count)
        yield from (
            state,
            in_flight,
            sessions,
            failures,
            speed,
            weights,
            pool_weights,
            queued,
            tenant_queued,
            total,
            probes,
            failures_total,
            transitions,
        )


class Metrics:
    def __init__(self, registry: Registry) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(GC_COLLECTOR)
        Info("dsrouter_build", "The running dsrouter", registry=r).info(
            {"version": __version__, "python": platform.python_version()}
        )
        self.requests = Counter(
            "dsrouter_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.ttfb = Histogram(
            "dsrouter_request_ttfb_seconds",
            "Time to the first answer byte",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "dsrouter_request_duration_seconds",
            "Time to the last answer byte",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_requests = Counter(
            "dsrouter_worker_requests",
            "Proxied requests by the worker that answered them last, and status",
            ["worker", "status"],
            registry=r,
        )
        self.retries = Counter(
            "dsrouter_retries",
            "Attempts moved to another worker, by the worker that failed the attempt",
            ["worker"],
            registry=r,
        )
        self.bytes = Counter(
            "dsrouter_bytes_proxied", "Body bytes proxied", ["direction"], registry=r
        )
        self.broadcasts = Counter(
            "dsrouter_broadcasts",
            "Control broadcasts by route and outcome",
            ["route", "outcome"],
            registry=r,
        )
        self.refits = Counter(
            "dsrouter_refits",
            "Weight changes of the pool by result: success, partial (some workers confirmed, "
            "the rest are stale) or failed",
            ["result"],
            registry=r,
        )
        self.restarts = Counter(
            "dsrouter_launcher_restarts", "Managed worker restarts", ["worker"], registry=r
        )
        self.queue_wait = Histogram(
            "dsrouter_queue_wait_seconds",
            "Time a request waited for a worker (router queue included), by that worker",
            ["worker"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sessions = Counter(
            "dsrouter_realtime_sessions",
            "WebSocket sessions by route and the close code the client got",
            ["route", "code"],
            registry=r,
        )
        self.session_duration = Histogram(
            "dsrouter_realtime_session_duration_seconds",
            "How long WebSocket sessions lasted",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.upgrades_waiting = Gauge(
            "dsrouter_realtime_upgrades_waiting",
            "WebSocket upgrades waiting for a free worker (realtime.when_busy = wait)",
            registry=r,
        )
        self.frames = Counter(
            "dsrouter_realtime_frames",
            "WebSocket messages relayed",
            ["direction"],
            registry=r,
        )
        self.tenant_queue_wait = Histogram(
            "dsrouter_tenant_queue_wait_seconds",
            "Time generation requests waited for a worker, by tenant",
            ["tenant"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tenant_requests = Counter(
            "dsrouter_tenant_requests",
            "Generation requests admitted within the tenant's limits",
            ["tenant"],
            registry=r,
        )
        self.tenant_cost = Counter(
            "dsrouter_tenant_cost_units",
            "Estimated GPU work (megapixel-steps) of the tenant's answered generation requests",
            ["tenant"],
            registry=r,
        )
        self.tenant_refused = Counter(
            "dsrouter_tenant_over_limit",
            "Generation requests refused with 429 by the limit they were over",
            ["tenant", "limit"],
            registry=r,
        )
        r.register(_WorkerCollector(registry))

    def count_restart(self, worker: str) -> None:
        """The launcher restarted `worker` (its `on_restart`)."""
        self.restarts.labels(worker).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
