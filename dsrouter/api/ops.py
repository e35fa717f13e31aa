"""Operator endpoints: Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from quart import Blueprint, Response

from dsrouter.api.workers import ctx

bp = Blueprint("ops", __name__)


@bp.get("/metrics")
async def metrics() -> Response:
    return Response(ctx().metrics.render(), content_type=CONTENT_TYPE_PLAIN_0_0_4)
