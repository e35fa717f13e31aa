"""RL control calls broadcast to the pool (shared/SEEDS.md "RL control").

Every broadcast holds the pool's control lock, so a release can never interleave with a
weight update. Bodies are forwarded verbatim; an empty body becomes `{}` because workers
answer an empty body on the weight routes with a plain-text 500 (WORKER_API.md §9).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import trio
from quart import Blueprint, request

from dsrouter.api.errors import error
from dsrouter.api.workers import ctx
from dsrouter.registry import Health, Worker

bp = Blueprint("rl", __name__)


def _active(w: Worker) -> bool:
    return w.health is not Health.DEAD and not w.sleeping and not w.draining


async def broadcast(workers: list[Worker], method: str, path: str,
                    body: bytes | None) -> list[dict[str, Any]]:
    """Send one control call to each worker concurrently, each bounded by the route timeout."""
    context = ctx()
    timeout = context.config.timeouts.control_s
    results: dict[str, dict[str, Any]] = {}

    async def one(worker: Worker) -> None:
        entry: dict[str, Any] = {"worker_url": worker.url, "status_code": None, "body": None}
        results[worker.url] = entry
        with context.registry.lease_worker(worker), trio.move_on_after(timeout) as scope:
            try:
                response = await context.client.request(
                    method, f"{worker.url}{path}", content=body,
                    headers=_headers(worker, json_body=body is not None))
            except httpx.HTTPError as exc:
                entry["error"] = f"Worker request failed: {type(exc).__name__}: {exc}"
                return
            entry["status_code"] = response.status_code
            try:
                entry["body"] = response.json()
            except ValueError:
                entry["body"] = response.text
        if scope.cancelled_caught:
            entry["error"] = f"Worker request timed out after {timeout:g}s"

    async with trio.open_nursery() as nursery:
        for worker in workers:
            nursery.start_soon(one, worker)
    answers = [results[w.url] for w in workers]
    ok = all(r["status_code"] == 200 for r in answers)
    context.metrics.broadcasts.labels(path, "ok" if ok else "partial").inc()
    return answers


def _headers(worker: Worker, *, json_body: bool) -> dict[str, str]:
    headers = {"content-type": "application/json"} if json_body else {}
    key = worker.api_key or ctx().config.security.worker_api_key
    if key:
        headers["authorization"] = f"Bearer {key}"
    return headers


async def _body() -> bytes:
    raw = await request.get_data()
    return raw if raw.strip() else b"{}"


def _control_route(path: str, targets: Callable[[Worker], bool], *,
                   method: str = "POST") -> Any:
    async def handler() -> Any:
        context = ctx()
        async with context.control_lock:
            workers = [w for w in context.registry.workers() if targets(w)]
            if not workers:
                return error(503, "No healthy workers available in the pool")
            body = await _body() if method == "POST" else None
            results = await broadcast(workers, method, path, body)
        answer: dict[str, Any] = {"results": results}
        if path == "/get_weights_checksum":
            answer["consistent"] = _checksums_agree(results)
        return answer

    handler.__name__ = "control_" + path.strip("/").replace("/", "_")
    bp.add_url_rule(path, view_func=handler, methods=[method])
    return handler


def _checksums_agree(results: list[dict[str, Any]]) -> bool:
    bodies = [json.dumps(r["body"], sort_keys=True) for r in results if r["status_code"] == 200]
    return len(bodies) == len(results) and len(set(bodies)) == 1


for _path in ("/update_weights_from_disk", "/update_weights_from_tensor",
              "/get_weights_checksum", "/v1/set_lora", "/v1/merge_lora_weights",
              "/v1/unmerge_lora_weights"):
    _control_route(_path, _active)
_control_route("/v1/list_loras", _active, method="GET")


@bp.post("/release_memory_occupation")
async def release_memory() -> Any:
    context = ctx()
    async with context.control_lock:
        workers = context.registry.workers()
        targets = [w for w in workers if _active(w)]
        if not targets:
            if any(w.sleeping for w in workers):
                return {"results": [], "message": "All workers are already sleeping"}
            return error(503, "No healthy workers available in the pool")
        results = await broadcast(targets, "POST", "/release_memory_occupation", await _body())
        for worker, result in zip(targets, results, strict=True):
            if result["status_code"] == 200:
                context.registry.set_sleeping(worker, True)
    return {"results": results}


@bp.post("/resume_memory_occupation")
async def resume_memory() -> Any:
    context = ctx()
    async with context.control_lock:
        targets = [w for w in context.registry.workers() if w.sleeping]
        if not targets:
            return {"results": [], "message": "No sleeping workers to resume"}
        results = await broadcast(targets, "POST", "/resume_memory_occupation", await _body())
        for worker, result in zip(targets, results, strict=True):
            if result["status_code"] == 200:
                context.registry.set_sleeping(worker, False)
    return {"results": results}
