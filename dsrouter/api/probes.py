"""Liveness, readiness and the router's own index page.

Three health questions, three routes, so each kind of probe asks the one it means:

* `/livez`: the process serves HTTP. 200 always (also while starting, draining or with the
  pool asleep): restarting the router fixes none of those, so a liveness probe must not
  fail on them.
* `/readyz`: a request sent now can be routed. 503 with the reason while the launcher
  starts the pool, while draining, while the pool sleeps or when no worker is routable.
* `/health` (`api/workers.py`): the predecessors' answer, kept as it was for their clients.

All three are public (`auth.PUBLIC_PATHS`), as is `/`: the router answers it with a short
JSON index instead of proxying it to some worker. While draining, the frontend answers
everything but `/livez` itself (503).
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from dsrouter import __version__
from dsrouter.api.workers import ctx

bp = Blueprint("probes", __name__)


@bp.get("/livez")
async def livez() -> Any:
    return {"status": "alive", "version": __version__}


def not_ready_reason() -> str | None:
    """Why a request sent now could not be routed, or None when it could."""
    context = ctx()
    if context.starting:
        return "starting: the launcher is bringing the workers up"
    registry = context.registry
    if registry.pool_sleeping:
        return "pool is asleep"
    if not registry.summary()["healthy_workers"]:
        return "no routable worker"
    return None


@bp.get("/readyz")
async def readyz() -> Any:
    reason = not_ready_reason()
    if reason is None:
        return {"status": "ready"}
    return {"status": "not ready", "reason": reason}, 503


@bp.get("/")
async def index() -> Any:
    return {
        "name": "dsrouter",
        "about": "router for SGLang diffusion workers",
        "version": __version__,
        "docs": "README.md of the dsrouter source tree; every route: /openapi.json",
        "openapi": "/openapi.json",
        "liveness": "/livez",
        "readiness": "/readyz",
        "health": "/health",
        "metrics": "/metrics",
        "workers": "/workers",
    }
