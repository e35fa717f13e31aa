"""The shared services every HTTP handler needs, built once by the daemon."""

from __future__ import annotations

import attrs

from dsrouter.config import Config
from dsrouter.health import HealthChecker
from dsrouter.metrics import Metrics
from dsrouter.registry import Registry
from dsrouter.status import Activity
from dsrouter.workers_http import WorkerHTTP


@attrs.define
class RouterContext:
    config: Config
    registry: Registry
    health: HealthChecker
    workers: WorkerHTTP
    """Every request to a worker goes through it (see `workers_http`)."""
    metrics: Metrics
    activity: Activity = attrs.Factory(Activity)
    """The last minutes of traffic, for `/status`."""
