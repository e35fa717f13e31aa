"""The shared services every HTTP handler needs, built once by the daemon."""

from __future__ import annotations

import attrs
import httpx

from dsrouter.config import Config
from dsrouter.health import HealthChecker
from dsrouter.metrics import Metrics
from dsrouter.registry import Registry


@attrs.define
class RouterContext:
    config: Config
    registry: Registry
    health: HealthChecker
    client: httpx.AsyncClient
    """For probes, broadcasts and fan-out reads: small JSON bodies only, never the hot path."""
    metrics: Metrics
