"""Worker management, router health, and the Miles aliases of both (shared/SEEDS.md)."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import trio
from quart import Blueprint, Response, current_app, jsonify, request

from dsrouter.api.errors import error
from dsrouter.context import RouterContext
from dsrouter.registry import Worker
from dsrouter.urls import InvalidWorkerURL, check_allowlist, normalize_worker_url

bp = Blueprint("workers", __name__)

PUT_FIELDS = {
    "is_dead": bool,
    "refresh_video_support": bool,
    "draining": bool,
    "remove_when_drained": bool,
}


def ctx() -> RouterContext:
    return current_app.config["DSROUTER"]


class BadRequest(Exception):
    """A client error whose message goes back verbatim in a 400."""


@bp.errorhandler(BadRequest)
async def _bad_request(exc: BadRequest) -> tuple[Response, int]:
    return error(400, str(exc))


async def _json_body(*, required: bool) -> Any:
    raw = await request.get_data()
    if not raw.strip():
        if required:
            raise BadRequest("request body must be a JSON object")
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"invalid JSON body: {exc}") from None


async def _url_from_request(*, check_allowlist_: bool = True) -> str:
    """The worker URL of an add or remove (`?url=`, `?worker_url=`, JSON), normalised; for
    an add also checked against `security.allowed_worker_networks`."""
    url = request.args.get("url") or request.args.get("worker_url")
    if url is None:
        body = await _json_body(required=False)
        if body is not None:
            if not isinstance(body, dict):
                raise BadRequest("request body must be a JSON object with 'url'")
            url = body.get("url", body.get("worker_url"))
    if url is None:
        raise BadRequest('worker url is required (?url=, ?worker_url=, or JSON {"url": ...})')
    if not isinstance(url, str):
        raise BadRequest("worker url must be a string")
    try:
        normalized = normalize_worker_url(url)
        if check_allowlist_:
            await check_allowlist(normalized, ctx().config.security.allowed_worker_networks)
    except InvalidWorkerURL as exc:
        raise BadRequest(str(exc)) from None
    return normalized


async def _register() -> Worker:
    """Register, probe once right away, and read capabilities if it answered healthy.

    The immediate probe means a client that registers a ready worker can route to it as soon
    as this call returns, instead of waiting for the next probe round.
    """
    context = ctx()
    url = await _url_from_request()
    worker, created = context.registry.add(url)
    if created:
        await context.health.probe_now(url)
        if worker.routable:
            with trio.move_on_after(context.config.health.timeout_s):
                await context.registry.request_capability_refresh(url).wait()
    return worker


@bp.post("/workers")
async def add_worker() -> Any:
    worker = await _register()
    return {"status": "success", "worker": worker.to_json()}


@bp.post("/add_worker")
async def miles_add_worker() -> Any:
    await _register()
    return {"status": "success", "worker_urls": [w.url for w in ctx().registry.workers()]}


@bp.post("/remove_worker")
async def miles_remove_worker() -> Any:
    """The Miles LLM router's remove, answered in the shape of its `/add_worker`. Removing
    forgets the worker's jobs, as `DELETE /workers/{id}` does."""
    url = await _url_from_request(check_allowlist_=False)
    registry = ctx().registry
    if registry.remove(url) is None:
        raise _NotFound(f"worker not found: {url}")
    return {"status": "success", "worker_urls": [w.url for w in registry.workers()]}


@bp.get("/workers")
async def list_workers() -> Any:
    registry = ctx().registry
    summary = registry.summary()
    return {
        "workers": [w.to_json() for w in registry.workers()],
        "queued": summary["queued"],
        "queued_by_tenant": registry.queued_by_tenant(),
        "target_version": registry.target_version,
        "pool_sleeping": registry.pool_sleeping,
        "managed_workers": ctx().managed_workers(),
    }


@bp.get("/list_workers")
async def miles_list_workers() -> Any:
    return {"urls": [w.url for w in ctx().registry.workers()]}


@bp.get("/health_workers")
async def miles_health_workers() -> Any:
    return {
        "workers": [
            {
                "url": w.url,
                "active_requests": w.in_flight,
                "is_dead": w.to_json()["is_dead"],
                "consecutive_failures": w.consecutive_failures,
            }
            for w in ctx().registry.workers()
        ]
    }


def _worker_from_path() -> Worker:
    """Decode the `{worker_id}` segment from the raw path, so `%2F` cannot split it."""
    raw_path: bytes = request.scope.get("raw_path") or request.path.encode()
    segment = raw_path.split(b"?", 1)[0].split(b"/workers/", 1)[1]
    try:
        worker_id = unquote(segment.decode("ascii"), errors="strict")
    except UnicodeError:
        raise BadRequest("worker_id is not a valid percent-encoded UTF-8 string") from None
    if not worker_id:
        raise BadRequest("worker_id is empty")
    worker = ctx().registry.by_id(worker_id)
    if worker is None:
        raise _NotFound(f"worker not found: {worker_id}")
    return worker


class _NotFound(Exception):
    pass


@bp.errorhandler(_NotFound)
async def _not_found(exc: _NotFound) -> tuple[Response, int]:
    return error(404, str(exc))


@bp.get("/workers/<path:_worker_id>")
async def get_worker(_worker_id: str) -> Any:
    return {"worker": _worker_from_path().to_json()}


@bp.put("/workers/<path:_worker_id>")
async def update_worker(_worker_id: str) -> Any:
    worker = _worker_from_path()
    body = await _json_body(required=True)
    if not isinstance(body, dict) or not body:
        raise BadRequest(
            "body must be a non-empty JSON object with any of: " + ", ".join(PUT_FIELDS)
        )
    for key, value in body.items():
        if key not in PUT_FIELDS:
            raise BadRequest(f"unknown field {key!r}; allowed: {', '.join(PUT_FIELDS)}")
        if not isinstance(value, PUT_FIELDS[key]):
            raise BadRequest(f"field {key!r} must be a boolean")
    context = ctx()
    if "is_dead" in body:
        context.registry.set_dead(worker, body["is_dead"])
    if "draining" in body:
        remove = body.get("remove_when_drained", True) and worker.managed is None
        context.registry.set_draining(worker, body["draining"], remove_when_idle=remove)
    if body.get("refresh_video_support"):
        with trio.move_on_after(context.config.health.timeout_s * 2):
            await context.registry.request_capability_refresh(worker.url).wait()
    return {"status": "success", "worker": worker.to_json()}


@bp.delete("/workers/<path:_worker_id>")
async def delete_worker(_worker_id: str) -> Any:
    worker = _worker_from_path()
    ctx().registry.remove(worker.url)
    return {"status": "success", "worker_id": worker.worker_id}


@bp.get("/health")
async def health() -> Any:
    """200 when a worker is routable, else 503: the predecessors' meaning, kept as it was
    (a sleeping pool is 503 here; see `/livez` and `/readyz` in `api/probes.py`)."""
    context = ctx()
    registry = context.registry
    summary = registry.summary()
    ok = summary["healthy_workers"] > 0
    status = "healthy" if ok else "starting" if context.starting else "unhealthy"
    body = {
        "status": status,
        **summary,
        "target_version": registry.target_version,
        "pool_sleeping": registry.pool_sleeping,
    }
    return jsonify(body), 200 if ok else 503
