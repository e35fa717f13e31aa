"""The `/status` page: the pool at a glance for a person with a browser, no Grafana needed.

One server-rendered HTML page with inline CSS and SVG: no build step, no external asset,
no script (it reloads itself with `<meta http-equiv="refresh">`). It reads the registry
(`Registry.workers`, `summary`) and `Activity`, the last minutes of traffic that
`AccessLog.finish` feeds; it changes nothing. Everything a worker or a client can put in a
string (errors, routes, model names) is escaped.
"""

from __future__ import annotations

import collections
import time
from html import escape

import attrs
import trio

from dsrouter.registry import Registry

BUCKET_S = 10.0
"""Width of one point of the charts."""
BUCKETS = 90
"""Points kept: 15 minutes of history."""
RECENT_ERRORS = 20
REFRESH_S = 5
STATE_COLOURS = {
    "healthy": "#2e7d32",
    "starting": "#f9a825",
    "stale": "#ef6c00",
    "sleeping": "#546e7a",
    "draining": "#6a1b9a",
    "dead": "#c62828",
}


@attrs.define
class Bucket:
    """Requests that ended in one `BUCKET_S` interval."""

    index: int
    requests: int = 0
    errors: int = 0
    latency_sum_s: float = 0.0
    latency_max_s: float = 0.0


@attrs.frozen
class RecentError:
    at: float
    """Wall clock, for display."""
    route: str
    status: str
    worker: str | None
    request_id: str


class Activity:
    """Throughput, latency and errors of the last minutes, bounded in memory.

    Buckets are keyed by the trio clock (monotonic); only the error list keeps wall times.
    An error is a 5xx answer or a request that ended without one ("aborted").
    """

    def __init__(self) -> None:
        self._buckets: collections.deque[Bucket] = collections.deque(maxlen=BUCKETS)
        self.errors: collections.deque[RecentError] = collections.deque(maxlen=RECENT_ERRORS)

    def record(
        self, route: str, status: str, elapsed_s: float, worker: str | None, request_id: str
    ) -> None:
        bucket = self._bucket(_index(trio.current_time()))
        bucket.requests += 1
        bucket.latency_sum_s += elapsed_s
        bucket.latency_max_s = max(bucket.latency_max_s, elapsed_s)
        if status == "aborted" or status.startswith("5"):
            bucket.errors += 1
            self.errors.appendleft(RecentError(time.time(), route, status, worker, request_id))

    def series(self) -> list[Bucket]:
        """One bucket per interval of the last `BUCKETS`, oldest first, empty ones included."""
        now = _index(trio.current_time())
        kept = {b.index: b for b in self._buckets}
        return [kept.get(i) or Bucket(i) for i in range(now - BUCKETS + 1, now + 1)]

    def _bucket(self, index: int) -> Bucket:
        if not self._buckets or self._buckets[-1].index != index:
            self._buckets.append(Bucket(index))
        return self._buckets[-1]


def _index(now: float) -> int:
    return int(now // BUCKET_S)


def render(registry: Registry, activity: Activity) -> str:
    """The whole page as one HTML document."""
    summary = registry.summary()
    series = activity.series()
    throughput = [b.requests / BUCKET_S for b in series]
    latency = [b.latency_sum_s / b.requests if b.requests else 0.0 for b in series]
    sleeping = " · pool asleep" if registry.pool_sleeping else ""
    target = registry.target_version or "launch weights"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_S}">
<title>dsrouter status</title>
<style>
body {{ font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; margin: .5em 0 1.5em; }}
th, td {{ padding: .25em .7em; border-bottom: 1px solid #ddd; text-align: left; }}
.state {{ color: #fff; border-radius: 3px; padding: 0 .4em; }}
.cards span {{ display: inline-block; margin-right: 1.5em; }}
.cards b {{ font-size: 1.4em; }}
figure {{ display: inline-block; margin: 0 2em 0 0; }}
figcaption {{ color: #555; }}
</style></head>
<body>
<h1>dsrouter</h1>
<p class="cards">
<span><b id="routable">{summary["healthy_workers"]}</b> / {summary["total_workers"]} routable</span>
<span><b>{summary["dead_workers"]}</b> dead</span>
<span><b>{summary["stale_workers"]}</b> stale</span>
<span><b id="in-flight">{summary["in_flight"]}</b> in flight</span>
<span><b id="queued">{summary["queued"]}</b> queued</span>
<span>weights: {escape(target)}{sleeping}</span>
</p>
<h2>Workers</h2>
{_workers(registry)}
<h2>Last {BUCKETS * BUCKET_S / 60:g} minutes</h2>
{_chart("requests per second", throughput, "#1565c0", "chart-throughput")}
{_chart("mean latency (s)", latency, "#6a1b9a", "chart-latency")}
<h2>Recent errors</h2>
{_errors(activity)}
<p><small>Refreshes every {REFRESH_S} s · {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
· <a href="/metrics">/metrics</a> · <a href="/workers">/workers</a></small></p>
</body></html>
"""


def _workers(registry: Registry) -> str:
    rows = []
    for worker in registry.workers():
        state = worker.state
        speed = worker.speed.seconds_per_unit
        rows.append(
            f'<tr data-worker="{escape(worker.url)}" data-state="{state}">'
            f"<td>{escape(worker.display_id)}</td><td>{escape(worker.url)}</td>"
            f'<td><span class="state" style="background:{STATE_COLOURS.get(state, "#777")}">'
            f"{state}</span></td>"
            f"<td>{worker.in_flight}</td><td>{worker.consecutive_failures}</td>"
            f"<td>{'' if speed is None else f'{speed:.3g}'}</td>"
            f"<td>{escape(worker.weights or '')}</td>"
            f"<td>{escape(worker.capabilities.model_id or '')}</td>"
            f"<td>{escape(worker.last_error or '')}</td></tr>"
        )
    if not rows:
        return "<p>No worker is registered.</p>"
    head = (
        "<tr><th>worker</th><th>url</th><th>state</th><th>in flight</th><th>failures</th>"
        "<th>s per unit</th><th>weights</th><th>model</th><th>last error</th></tr>"
    )
    return f'<table id="workers">{head}{"".join(rows)}</table>'


def _chart(title: str, values: list[float], colour: str, ident: str) -> str:
    """A small line chart, newest point on the right, scaled to its own maximum."""
    width, height = 360, 80
    top = max(values) or 1.0
    step = width / max(len(values) - 1, 1)
    points = " ".join(
        f"{i * step:.1f},{height - v / top * (height - 4):.1f}" for i, v in enumerate(values)
    )
    return (
        f'<figure><svg id="{ident}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{title}">'
        f'<rect width="{width}" height="{height}" fill="#fafafa" stroke="#ddd"/>'
        f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{points}"/></svg>'
        f"<figcaption>{title}: now {values[-1]:.3g}, max {top if max(values) else 0:.3g}"
        "</figcaption></figure>"
    )


def _errors(activity: Activity) -> str:
    if not activity.errors:
        return "<p>None.</p>"
    rows = "".join(
        f"<tr><td>{time.strftime('%H:%M:%S', time.gmtime(e.at))}</td><td>{escape(e.route)}</td>"
        f"<td>{escape(e.status)}</td><td>{escape(e.worker or '')}</td>"
        f"<td>{escape(e.request_id)}</td></tr>"
        for e in activity.errors
    )
    head = "<tr><th>UTC</th><th>route</th><th>status</th><th>worker</th><th>request id</th></tr>"
    return f'<table id="errors">{head}{rows}</table>'
