"""The shared services every HTTP handler needs, built once by the daemon."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from dsrouter.config import Config
from dsrouter.health import HealthChecker
from dsrouter.metrics import Metrics
from dsrouter.registry import Registry
from dsrouter.status import Activity
from dsrouter.tracing import Tracing
from dsrouter.workers_http import WorkerHTTP

if TYPE_CHECKING:
    from dsrouter.launcher import Pool, RayPool


@attrs.define
class RouterContext:
    config: Config
    registry: Registry
    health: HealthChecker
    workers: WorkerHTTP
    """Every request to a worker goes through it (see `workers_http`)."""
    metrics: Metrics
    activity: Activity = attrs.Factory(Activity)
    tracing: Tracing = attrs.Factory(Tracing)
    """Spans of requests, refits and broadcasts; `Tracing()` (does nothing) when off.
    Built once at start-up from `[tracing]` (a reload does not change it)."""
    """The last minutes of traffic, for `/status`."""
    starting: bool = False
    """True while the launcher brings the pool up for the first time: the port already
    answers (`/health` 503 "starting", `/workers`, `/livez`), nothing is routable yet."""
    launch: Pool | RayPool | None = None
    """The launched workers from their first start on (`run_pool` hands the pool over
    before its workers are ready), for `/workers` and the start-up STATUS line."""

    def show_launch(self, pool: Pool | RayPool) -> None:
        self.launch = pool

    def managed_workers(self) -> list[dict[str, Any]]:
        """Every launcher slot, whatever its state; [] without a launcher."""
        return [] if self.launch is None else self.launch.managed_workers()
