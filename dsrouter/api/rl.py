"""RL control routes (shared/SEEDS.md "RL control"), thin over `control.PoolControl`.

Answers keep the seed shape `{"results": [{"worker_url", "status_code", "body"}...]}` and add
fields (`success`, `version`, `stale_workers`); the status stays 200 unless a refit asks
for `strict` semantics. An empty body is sent to workers as `{}`: they answer an empty body
on the weight routes with a plain-text 500 (WORKER_API.md §9). Every call of a broadcast
carries the request's `x-request-id`, so the workers' logs can be matched to the router's.
Weight changes and reads go to every active worker, or only to those `x-dsrouter-target-workers`
names (`PoolControl.resolve_targets`).
"""

from __future__ import annotations

import json
from contextlib import AbstractContextManager
from typing import Any

from quart import Blueprint, Response, current_app, request

from dsrouter.access import new_request_id
from dsrouter.api.errors import error
from dsrouter.control import (
    TARGET_HEADER,
    WEIGHT_ROUTES,
    ControlError,
    PoolControl,
    active,
    no_active_workers,
)

bp = Blueprint("rl", __name__)


def control() -> PoolControl:
    return current_app.config["DSROUTER_CONTROL"]


def request_id() -> str:
    """The client's `x-request-id` (the frontend adds one when there is none), or a new one."""
    return request.headers.get("x-request-id") or new_request_id()


def client_trace() -> AbstractContextManager[None]:
    """The spans of this call continue the caller's trace (its `traceparent`), so a
    trainer that traces sees its refit's broadcasts under its own span."""
    headers = request.headers
    return control().context.tracing.continue_trace(
        headers.get("traceparent"), headers.get("tracestate")
    )


@bp.errorhandler(ControlError)
async def _control_error(exc: ControlError) -> tuple[Response, int]:
    return error(exc.status, str(exc))


def _weight_route(path: str) -> None:
    async def handler() -> Any:
        body = await request.get_data()
        with client_trace():
            status, answer = await control().change_weights(
                path, body, request_id(), request.headers.get(TARGET_HEADER)
            )
        return answer, status

    handler.__name__ = "weights_" + path.strip("/").replace("/", "_")
    bp.add_url_rule(path, view_func=handler, methods=["POST"])


def _read_route(path: str, method: str) -> None:
    async def handler() -> Any:
        pool = control()
        with client_trace():
            return await _read(pool, path, method)

    handler.__name__ = "read_" + path.strip("/").replace("/", "_")
    bp.add_url_rule(path, view_func=handler, methods=[method])


async def _read(pool: PoolControl, path: str, method: str) -> dict[str, Any]:
    """A weight read (checksums, LoRA list) from every active worker or the named ones."""
    async with pool.registry.control_lock:
        workers = pool.resolve_targets(request.headers.get(TARGET_HEADER))
        if workers is None:
            workers = [w for w in pool.registry.workers() if active(w)]
        if not workers:
            raise no_active_workers(pool.registry.workers())
        body = (await request.get_data() or b"{}") if method == "POST" else None
        results = await pool.broadcast(workers, method, path, body, request_id())
    answer: dict[str, Any] = {"results": results}
    if path == "/get_weights_checksum":
        answer["consistent"] = _checksums_agree(results)
    return answer


def _checksums_agree(results: list[dict[str, Any]]) -> bool:
    bodies = [json.dumps(r["body"], sort_keys=True) for r in results if r["status_code"] == 200]
    return len(bodies) == len(results) and len(set(bodies)) == 1


for _path in sorted(WEIGHT_ROUTES):
    _weight_route(_path)
_read_route("/get_weights_checksum", "POST")
# Checks every worker's tensors against the trainer's hashes; as an admin route it can never
# reach a worker through the inference catch-all.
_read_route("/update_weights_from_tensor_checker", "POST")
_read_route("/v1/list_loras", "GET")


@bp.post("/release_memory_occupation")
async def release_memory() -> Any:
    body = await request.get_data()
    with client_trace():
        return await control().release(body, request_id())


@bp.post("/resume_memory_occupation")
async def resume_memory() -> Any:
    body = await request.get_data()
    with client_trace():
        return await control().resume(body, request_id())
