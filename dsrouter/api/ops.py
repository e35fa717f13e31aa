"""Operator endpoints: Prometheus metrics and the OpenAPI description."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from quart import Blueprint, Response

from dsrouter.api.workers import ctx
from dsrouter.openapi import build_openapi

bp = Blueprint("ops", __name__)


@bp.get("/metrics")
async def metrics() -> Response:
    return Response(ctx().metrics.render(), content_type=CONTENT_TYPE_PLAIN_0_0_4)


@bp.get("/openapi.json")
async def openapi() -> dict:
    return build_openapi()
