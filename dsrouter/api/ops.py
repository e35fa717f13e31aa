"""Operator endpoints: Prometheus metrics, the status page, the OpenAPI description, config
reload."""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4
from quart import Blueprint, Response, current_app

from dsrouter.api.workers import ctx
from dsrouter.config import dump_config
from dsrouter.openapi import build_openapi
from dsrouter.status import render

bp = Blueprint("ops", __name__)


@bp.get("/metrics")
async def metrics() -> Response:
    return Response(ctx().metrics.render(), content_type=CONTENT_TYPE_PLAIN_0_0_4)


@bp.get("/status")
async def status() -> Response:
    context = ctx()
    page = render(context.registry, context.activity)
    return Response(page, content_type="text/html; charset=utf-8")


@bp.get("/openapi.json")
async def openapi() -> dict:
    return build_openapi()


@bp.post("/admin/reload")
async def reload() -> Any:
    ok, answer = await current_app.config["DSROUTER_RELOAD"].reload()
    return answer, 200 if ok else 400


@bp.get("/admin/config")
async def effective_config() -> Any:
    return dump_config(ctx().config)
