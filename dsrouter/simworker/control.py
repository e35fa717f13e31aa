"""RL and memory control routes of the simulated worker (`WORKER_API.md` sections 8 and 9).

All of them wait in the worker's single FIFO queue behind generations, as on a real worker;
that is what makes the router's drain-before-refit matter. Refits are simulated by
name: the worker "loads" whatever `model_path` it is given, except paths that contain
`missing` (a load failure, 400) or when the `refit_fails` fault is set, so tests can make
exactly one worker of a pool miss a refit.

Simulator-only: a successful weight update also answers `simworker_received`, the SHA-256 of
the body exactly as it arrived and its `x-request-id`, so tests can check what the router's
broadcast sent (the router keeps workers' answer bodies, not their headers).
"""

from __future__ import annotations

import json
from typing import Any

from dsrouter.simworker.asgi import (
    Request,
    Response,
    Uncaught,
    json_response,
    missing_field,
    parse_json_object,
)
from dsrouter.simworker.state import SimWorker

REFIT_ASLEEP = (
    "Cannot update weights while the server is sleeping. Call resume_memory_occupation first."
)


async def _weights_body(request: Request) -> dict[str, Any]:
    """The weight routes parse the body by hand: empty or invalid JSON is an uncaught 500."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        raise Uncaught from None
    if not isinstance(body, dict):
        raise Uncaught
    return body


def _received(request: Request) -> dict[str, str]:
    return {
        "body_sha256": request.body_sha256.hexdigest(),
        "x-request-id": request.header("x-request-id"),
    }


def _failed(status: int, message: str) -> Response:
    return json_response(status, {"success": False, "message": message})


async def update_weights_from_disk(worker: SimWorker, request: Request) -> Response:
    body = await _weights_body(request)
    path = body.get("model_path")
    if not isinstance(path, str) or not path:
        return _failed(400, "model_path is required")
    async with worker.scheduled():
        if worker.sleeping:
            return _failed(500, REFIT_ASLEEP)
        if worker.faults.refit_fails or "missing" in path:
            return _failed(400, f"Failed to load weights from {path}: no such checkpoint")
        worker.model_path = path
        worker.weight_updates += 1
    return json_response(
        200,
        {
            "success": True,
            "message": f"Updated weights from {path} (simulated)",
            "simworker_received": _received(request),
        },
    )


async def update_weights_from_tensor(worker: SimWorker, request: Request) -> Response:
    body = await _weights_body(request)
    payloads = body.get("serialized_named_tensors")
    if not isinstance(payloads, list) or not payloads:
        return _failed(400, "serialized_named_tensors must be a non-empty list")
    async with worker.scheduled():
        if worker.sleeping:
            return _failed(500, REFIT_ASLEEP)
        if worker.faults.refit_fails:
            return _failed(400, "Failed to apply the tensor update")
        worker.weight_updates += 1
    return json_response(
        200,
        {
            "success": True,
            "message": "Updated weights from tensors",
            "simworker_received": _received(request),
        },
    )


async def update_weights_from_tensor_checker(worker: SimWorker, request: Request) -> Response:
    body = await _weights_body(request)
    if not body.get("target_module") or not isinstance(
        body.get("expected_named_tensors_sha256"), dict
    ):
        return _failed(400, "target_module and expected_named_tensors_sha256 are required")
    async with worker.scheduled():
        pass
    return json_response(200, {"success": True, "message": "tensors match"})


async def get_weights_checksum(worker: SimWorker, request: Request) -> Response:
    body = await _weights_body(request)
    modules = body.get("module_names")
    if modules is not None and not (
        isinstance(modules, list) and all(isinstance(m, str) for m in modules)
    ):
        return json_response(500, {"error": "module_names must be a list of strings"})
    async with worker.scheduled():
        return json_response(200, worker.checksums(modules))


async def release_memory(worker: SimWorker, request: Request) -> Response:
    await request.drain()
    async with worker.scheduled():
        if worker.sleeping:
            message = "already sleeping"
        else:
            worker.sleeping = True
            message = "released GPU memory (simulated)"
    return json_response(200, {"success": True, "sleeping": True, "message": message})


async def resume_memory(worker: SimWorker, request: Request) -> Response:
    await request.drain()
    async with worker.scheduled():
        if worker.sleeping:
            worker.sleeping = False
            message = "resumed GPU memory (simulated)"
        else:
            message = "already awake"
    return json_response(200, {"success": True, "sleeping": False, "message": message})


async def set_lora(worker: SimWorker, request: Request) -> Response:
    body = parse_json_object(await request.read())
    nicknames = body.get("lora_nickname")
    if nicknames is None:
        raise missing_field("lora_nickname", body)
    names = nicknames if isinstance(nicknames, list) else [nicknames]
    paths = body.get("lora_path")
    paths = paths if isinstance(paths, list) else [paths] * len(names)
    async with worker.scheduled():
        for name, path in zip(names, paths, strict=False):
            known = worker.loras.get(name)
            if path is None and known is None:
                return json_response(
                    500, {"detail": f"LoRA {name!r} is not loaded and no lora_path was given"}
                )
            if isinstance(path, str) and "missing" in path:
                return json_response(500, {"detail": f"cannot load LoRA from {path}"})
            worker.loras[name] = {
                "path": path or known["path"],
                "active": True,
                "merged": False,
                "strength": body.get("strength", 1.0),
            }
        for name, adapter in worker.loras.items():
            adapter["active"] = name in names
    return json_response(200, {"status": "ok", "message": f"LoRA {names} set"})


async def merge_lora(worker: SimWorker, request: Request) -> Response:
    parse_json_object(await request.read() or b"{}")
    async with worker.scheduled():
        active = [a for a in worker.loras.values() if a["active"]]
        if not active:
            return json_response(500, {"detail": "no active LoRA to merge"})
        for adapter in active:
            adapter["merged"] = True
    return json_response(200, {"status": "ok", "message": "merged"})


async def unmerge_lora(worker: SimWorker, request: Request) -> Response:
    parse_json_object(await request.read() or b"{}")
    async with worker.scheduled():
        for adapter in worker.loras.values():
            adapter["merged"] = False
    return json_response(200, {"status": "ok", "message": "unmerged"})


async def list_loras(worker: SimWorker, request: Request) -> Response:
    async with worker.scheduled():
        loaded = [{"nickname": name, "path": a["path"]} for name, a in worker.loras.items()]
        active = [
            {
                "nickname": name,
                "nicknames": [name],
                "path": a["path"],
                "merged": a["merged"],
                "mode": "merge" if a["merged"] else "dynamic",
                "strength": a["strength"],
                "strengths": [a["strength"]],
            }
            for name, a in worker.loras.items()
            if a["active"]
        ]
    return json_response(200, {"loaded_adapters": loaded, "active": {"transformer": active}})


async def stats(worker: SimWorker, request: Request) -> Response:
    async with worker.scheduled():
        return json_response(
            200,
            {
                "status": "ok",
                "model_path": worker.options.model_path,
                "disagg": {"role": "monolithic", "message": "not in disagg mode"},
            },
        )
