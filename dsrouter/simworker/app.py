"""The simulated worker's ASGI application: route table, readiness gates and faults.

One process may serve many ports (`--port-range`); each port is an independent worker with
its own `SimWorker` state, picked from the ASGI scope's server address.

Every answer carries `x-simworker-model-path` and `x-simworker-weight-version` (which weights
served it) and every POST answer `x-simworker-body-sha256` (what arrived), so tests can check
what the router did without trusting the router's own account.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote, urlsplit

import trio

from dsrouter.simworker import control, generation, realtime
from dsrouter.simworker.asgi import (
    ClientGone,
    CutShort,
    HTTPError,
    Receive,
    Request,
    Response,
    Scope,
    Send,
    json_response,
    send_response,
)
from dsrouter.simworker.options import IMAGE_INPUT_ACCEPTED
from dsrouter.simworker.state import SimWorker, now

Handler = Callable[[SimWorker, Request], Awaitable[Response]]

# Never held during warmup (WORKER_API.md section 2); nor counted as work in `in_flight`.
BYPASS = frozenset(
    {"/metrics", "/liveness", "/health", "/health_generate", "/model_info", "/server_info"}
)
DISCOVERY = BYPASS | {"/v1/models", "/models", "/v1/model_info", "/openapi.json"}
EXIT_STATUS = 3


# ---- discovery ----------------------------------------------------------------------------


def _card(worker: SimWorker) -> dict[str, Any]:
    o = worker.options
    return {
        "id": o.served_model_name,
        "object": "model",
        "created": now(),
        "owned_by": "sglang",
        "root": o.served_model_name,
        "parent": None,
        "max_model_len": None,
        "num_gpus": o.num_gpus,
        "task_type": o.task_types[0],
        "supported_task_types": o.task_types,
        "dit_precision": "bf16",
        "vae_precision": "fp32",
        "pipeline_name": "SimPipeline",
        "pipeline_class": "dsrouter.simworker.SimPipeline",
    }


async def health(worker: SimWorker, request: Request) -> Response:
    if worker.faults.backend_failed:
        return json_response(503, {"status": "unhealthy", "error": worker.faults.backend_failed})
    if not worker.warm.is_set():
        return Response(503, b"", None)
    return json_response(200, {"status": "ok"})


async def liveness(worker: SimWorker, request: Request) -> Response:
    return json_response(200, {"status": "ok"})


async def server_info(worker: SimWorker, request: Request) -> Response:
    o = worker.options
    return json_response(
        200,
        {
            "model_path": o.model_path,
            "served_model_name": o.served_model_name,
            "tp_size": 1,
            "dp_size": 1,
            "version": "0.5.23",
        },
    )


async def model_info(worker: SimWorker, request: Request) -> Response:
    o = worker.options
    outputs = o.output_types
    return json_response(
        200,
        {
            "model_path": o.model_path,
            "is_generation": True,
            "model_type": "diffusion",
            "architectures": ["SimPipeline"],
            "has_image_understanding": any(t in IMAGE_INPUT_ACCEPTED for t in o.task_types),
            "has_audio_understanding": False,
            "task_type": o.task_types[0],
            "supported_task_types": o.task_types,
            "output_types": outputs,
            "is_image_gen": outputs == ["IMAGE"],
        },
    )


async def models(worker: SimWorker, request: Request) -> Response:
    return json_response(200, {"object": "list", "data": [_card(worker)]})


async def legacy_models(worker: SimWorker, request: Request) -> Response:
    card = _card(worker)
    return json_response(
        200,
        {
            "model_path": worker.options.model_path,
            **{
                k: card[k]
                for k in (
                    "num_gpus",
                    "task_type",
                    "supported_task_types",
                    "dit_precision",
                    "vae_precision",
                )
            },
            "vae_decode_precision": "fp32",
        },
    )


async def v1_model_info(worker: SimWorker, request: Request) -> Response:
    return json_response(200, {"model_path": worker.options.model_path})


async def openapi(worker: SimWorker, request: Request) -> Response:
    paths: dict[str, dict[str, Any]] = {}
    for method, path in ROUTES:
        paths.setdefault(path, {})[method.lower()] = {}
    return json_response(
        200,
        {
            "openapi": "3.1.0",
            "info": {"title": "sglang diffusion worker (simulated)", "version": "0.5.23"},
            "paths": paths,
        },
    )


async def one_model(worker: SimWorker, name: str) -> Response:
    if name == worker.options.served_model_name:
        return json_response(200, _card(worker))
    return json_response(
        404,
        {
            "error": {
                "message": f"The model '{name}' does not exist",
                "type": "invalid_request_error",
                "param": "model",
                "code": "model_not_found",
            }
        },
    )


# ---- test controls ------------------------------------------------------------------------


async def sim_state(worker: SimWorker, request: Request) -> Response:
    return json_response(200, worker.state())


async def sim_traces(worker: SimWorker, request: Request) -> Response:
    """The trace headers of the last requests, oldest first (test aid, never proxied)."""
    return json_response(200, {"requests": list(worker.trace_headers)})


async def sim_faults(worker: SimWorker, request: Request) -> Response:
    try:
        changes = json.loads(await request.read() or b"{}")
    except ValueError:
        return json_response(400, {"detail": "expected a JSON object"})
    if not isinstance(changes, dict):
        return json_response(400, {"detail": "expected a JSON object"})
    problems = worker.faults.update(changes)
    if problems:
        return json_response(400, {"detail": problems})
    return json_response(200, worker.state()["faults"])


# ---- routing ------------------------------------------------------------------------------

ROUTES: dict[tuple[str, str], Handler] = {
    ("GET", "/health"): health,
    ("GET", "/health_generate"): health,
    ("GET", "/liveness"): liveness,
    ("GET", "/server_info"): server_info,
    ("GET", "/model_info"): model_info,
    ("GET", "/v1/models"): models,
    ("GET", "/models"): legacy_models,
    ("GET", "/v1/model_info"): v1_model_info,
    ("GET", "/openapi.json"): openapi,
    ("GET", "/stats"): control.stats,
    ("POST", "/v1/images/generations"): generation.images_generations,
    ("POST", "/v1/images/edits"): generation.images_edits,
    ("POST", "/v1/videos"): generation.videos_create,
    ("GET", "/v1/videos"): lambda w, r: generation.list_jobs(w.videos, r),
    ("POST", "/v1/meshes"): generation.meshes_create,
    ("GET", "/v1/meshes"): lambda w, r: generation.list_jobs(w.meshes, r),
    ("POST", "/rollout/generate"): generation.rollout,
    ("POST", "/update_weights_from_disk"): control.update_weights_from_disk,
    ("POST", "/update_weights_from_tensor"): control.update_weights_from_tensor,
    ("POST", "/update_weights_from_tensor_checker"): control.update_weights_from_tensor_checker,
    ("POST", "/get_weights_checksum"): control.get_weights_checksum,
    ("POST", "/release_memory_occupation"): control.release_memory,
    ("POST", "/resume_memory_occupation"): control.resume_memory,
    ("POST", "/v1/set_lora"): control.set_lora,
    ("POST", "/v1/merge_lora_weights"): control.merge_lora,
    ("POST", "/v1/unmerge_lora_weights"): control.unmerge_lora,
    ("GET", "/v1/list_loras"): control.list_loras,
    ("GET", "/_sim/state"): sim_state,
    ("POST", "/_sim/faults"): sim_faults,
    ("GET", "/_sim/traces"): sim_traces,
}
_JOB = re.compile(r"^/v1/(videos|meshes)/([^/]+)(/content)?$")
_IMAGE = re.compile(r"^/v1/images/([^/]+)/content$")
_MODEL = re.compile(r"^/v1/models/(.+)$")


async def _resolve(worker: SimWorker, request: Request) -> Response:
    method, path = request.method, request.path
    handler = ROUTES.get((method, path))
    if handler is not None:
        return await handler(worker, request)
    if (match := _JOB.match(path)) and not path.endswith("/"):
        kind, job_id, content = match.groups()
        store = worker.videos if kind == "videos" else worker.meshes
        label = "Video" if kind == "videos" else "Mesh"
        if content and method == "GET":
            return await generation.job_content(store, request, job_id, label)
        if not content and method == "GET":
            return await generation.get_job(store, job_id, label)
        if not content and method == "DELETE":
            return await generation.delete_job(store, job_id, label)
        return json_response(405, {"detail": "Method Not Allowed"})
    if match := _IMAGE.match(path):
        if method != "GET":
            return json_response(405, {"detail": "Method Not Allowed"})
        return await generation.image_content(worker, request, match.group(1))
    if (match := _MODEL.match(path)) and method == "GET":
        return await one_model(worker, match.group(1))
    if any(p == path for _, p in ROUTES):
        return json_response(405, {"detail": "Method Not Allowed"})
    return json_response(404, {"detail": "Not Found"})


async def _respond(worker: SimWorker, request: Request) -> Response:
    path = request.path
    if path.startswith("/_sim/"):
        return await _resolve(worker, request)
    if worker.faults.backend_failed and request.method == "POST":
        return json_response(503, {"error": worker.faults.backend_failed})
    if path not in BYPASS:
        await worker.warm.wait()
    if request.method == "POST" and worker.roll(worker.faults.unavailable_rate):
        await request.drain()
        return json_response(503, {"error": "Service temporarily unavailable"})
    if request.method == "POST" and worker.roll(worker.faults.hang_rate):
        await request.drain()
        await trio.sleep_forever()
    try:
        return await _resolve(worker, request)
    except HTTPError as error:
        return error.response


class SimApp:
    """The ASGI callable served by hypercorn for every simulated port."""

    def __init__(self, workers: dict[int, SimWorker], api_key: str = "") -> None:
        self.workers = workers
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    def _refused(self, request: Request) -> bool:
        """`--require-api-key`: the operator's own `/_sim/*` routes stay open."""
        if self.expected is None or request.path.startswith("/_sim/"):
            return False
        return dict(request.scope["headers"]).get(b"authorization") != self.expected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        worker = self.workers[scope["server"][1]]
        scope = _as_parsed_by_httptools(scope)
        request = Request(scope, receive)
        if self._refused(request):
            await request.drain()
            await send_response(send, json_response(401, {"error": "missing or wrong API key"}), [])
            return
        await _serve_one(worker, request, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """`--require-api-key` refuses the upgrade (401) as an authenticating proxy would."""
        worker = self.workers[scope["server"][1]]
        headers = dict(scope["headers"])
        if self.expected is not None and headers.get(b"authorization") != self.expected:
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            return
        await realtime.serve(worker, scope, receive, send)


def _latin1(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _as_parsed_by_httptools(scope: Scope) -> Scope:
    """The path a real worker routes by: uvicorn's httptools parser reduces an
    absolute-form target (`http://host/path`) to its path and drops a `#fragment`, so the
    simulated worker does too (a router must not be fooled into forwarding either)."""
    raw: bytes = scope.get("raw_path") or b""
    if not raw.startswith(b"/") or b"#" in raw:
        parts = urlsplit(raw.decode("latin-1"))
        path = parts.path or "/"
        return {**scope, "raw_path": path.encode("latin-1"), "path": unquote(path)}
    return scope


async def _serve_one(worker: SimWorker, request: Request, send: Send) -> None:
    path = request.path
    counted = not (path in DISCOVERY or path.startswith("/_sim/"))
    dies = False
    if counted:
        worker.in_flight += 1
        worker.requests_total += 1
        headers = dict(request.scope["headers"])
        worker.trace_headers.append(
            {
                "method": request.method,
                "path": path,
                "traceparent": _latin1(headers.get(b"traceparent")),
                "tracestate": _latin1(headers.get(b"tracestate")),
            }
        )
        if worker.faults.exit_after is not None:
            worker.faults.exit_after -= 1
            dies = worker.faults.exit_after <= 0
    try:
        with trio.CancelScope() as request_scope:
            async with trio.open_nursery() as watcher:
                request.on_body_done = lambda: watcher.start_soon(
                    request.watch_disconnect, request_scope
                )
                if request.method != "POST":
                    await request.drain()
                response = await _respond(worker, request)
                await request.drain()
                extra = [
                    ("x-simworker-model-path", worker.model_path),
                    ("x-simworker-weight-version", worker.weight_version),
                ]
                if request.method == "POST":
                    extra.append(("x-simworker-body-sha256", request.body_sha256.hexdigest()))
                size = (
                    len(response.body) if isinstance(response.body, bytes) else response.length or 0
                )
                try:
                    await send_response(
                        send,
                        response,
                        extra,
                        worker.faults.slow_body_bps,
                        cut_after=size // 2 if dies else None,
                    )
                except CutShort:
                    os._exit(EXIT_STATUS)
                watcher.cancel_scope.cancel()
    except ClientGone:
        pass
    finally:
        if counted:
            worker.in_flight -= 1
