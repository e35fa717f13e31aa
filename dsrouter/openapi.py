"""The OpenAPI 3.1 description of the router's own routes, served at `/openapi.json`.

Inference routes are described as pass-through (their bodies are the worker's contract);
management and control routes are described fully, so schema-driven fuzzers can exercise
them.
"""

from __future__ import annotations

from typing import Any

from dsrouter import __version__

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_WORKER = {
    "type": "object",
    "required": ["worker_id", "display_id", "url", "active_requests", "is_dead", "is_sleeping",
                 "consecutive_failures", "video_support"],
    "properties": {
        "worker_id": {"type": "string"}, "display_id": {"type": "string"},
        "url": {"type": "string"}, "state": {"type": "string"},
        "active_requests": {"type": "integer"}, "is_dead": {"type": "boolean"},
        "is_sleeping": {"type": "boolean"}, "is_draining": {"type": "boolean"},
        "consecutive_failures": {"type": "integer"},
        "video_support": {"type": ["boolean", "null"]},
    },
}
_URL_BODY = {"type": "object", "properties": {"url": {"type": "string"},
                                              "worker_url": {"type": "string"}}}
_RESULTS = {"type": "object", "properties": {"results": {"type": "array", "items": {
    "type": "object", "properties": {"worker_url": {"type": "string"},
                                     "status_code": {"type": ["integer", "null"]},
                                     "body": {}}}}}}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _answers(ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    answers: dict[str, Any] = {"200": {"description": "OK", **_json(ok)}}
    for code in errors:
        answers[str(code)] = {"description": "error", **_json(_ERROR)}
    return answers


def _worker_id_param() -> dict[str, Any]:
    return {"name": "worker_id", "in": "path", "required": True,
            "description": "the worker URL, percent-encoded", "schema": {"type": "string"}}


def _control(summary: str) -> dict[str, Any]:
    return {"post": {"summary": summary, "requestBody": {"required": False, **_json(
        {"type": "object"})}, "responses": _answers(_RESULTS, 401, 503)}}


def _passthrough(summary: str, method: str = "post") -> dict[str, Any]:
    return {method: {"summary": summary + " (proxied to a worker, streamed)",
                     "responses": {"200": {"description": "the worker's answer"},
                                   "502": {"description": "worker unreachable", **_json(_ERROR)},
                                   "503": {"description": "no routable worker", **_json(_ERROR)},
                                   "504": {"description": "worker too slow", **_json(_ERROR)}}}}


def build_openapi() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/health": {"get": {"summary": "router health", "responses": {
            "200": {"description": "a routable worker exists", **_json({"type": "object"})},
            "503": {"description": "none, or draining", **_json({"type": "object"})}}}},
        "/workers": {
            "get": {"summary": "list workers", "responses": _answers(
                {"type": "object", "properties": {"workers": {"type": "array",
                                                              "items": _WORKER}}}, 401)},
            "post": {"summary": "register a worker",
                     "parameters": [{"name": "url", "in": "query", "schema": {"type": "string"}}],
                     "requestBody": {"required": False, **_json(_URL_BODY)},
                     "responses": _answers({"type": "object"}, 400, 401)},
        },
        "/workers/{worker_id}": {
            "parameters": [_worker_id_param()],
            "get": {"summary": "one worker", "responses": _answers(
                {"type": "object", "properties": {"worker": _WORKER}}, 400, 401, 404)},
            "put": {"summary": "quarantine, recover, drain, refresh capabilities",
                    "requestBody": {"required": True, **_json({
                        "type": "object", "additionalProperties": False, "minProperties": 1,
                        "properties": {"is_dead": {"type": "boolean"},
                                       "refresh_video_support": {"type": "boolean"},
                                       "draining": {"type": "boolean"},
                                       "remove_when_drained": {"type": "boolean"}}})},
                    "responses": _answers({"type": "object"}, 400, 401, 404)},
            "delete": {"summary": "deregister", "responses": _answers(
                {"type": "object"}, 400, 401, 404)},
        },
        "/add_worker": {"post": {"summary": "Miles alias of POST /workers",
                                 "parameters": [{"name": "url", "in": "query",
                                                 "schema": {"type": "string"}}],
                                 "responses": _answers({"type": "object"}, 400, 401)}},
        "/list_workers": {"get": {"summary": "Miles: worker URLs",
                                  "responses": _answers({"type": "object"}, 401)}},
        "/health_workers": {"get": {"summary": "Miles: per-worker health",
                                    "responses": _answers({"type": "object"}, 401)}},
        "/v1/models": {"get": {"summary": "models of the pool, merged",
                               "responses": _answers({"type": "object"}, 502, 503)}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text exposition format"}}}},
        "/update_weights_from_disk": _control("refit every active worker from disk"),
        "/update_weights_from_tensor": _control("refit from tensors (co-located trainer)"),
        "/get_weights_checksum": _control("per-worker weight checksums"),
        "/release_memory_occupation": _control("put the pool to sleep"),
        "/resume_memory_occupation": _control("wake the pool"),
        "/v1/set_lora": _control("load or activate a LoRA on every worker"),
        "/v1/merge_lora_weights": _control("merge LoRA weights on every worker"),
        "/v1/unmerge_lora_weights": _control("unmerge LoRA weights on every worker"),
        "/v1/images/generations": _passthrough("text to image"),
        "/v1/images/edits": _passthrough("image edit (multipart)"),
        "/v1/videos": _passthrough("create a video job"),
        "/v1/videos/{video_id}": _passthrough("video job status (sticky)", "get"),
        "/v1/videos/{video_id}/content": _passthrough("video bytes (sticky)", "get"),
        "/rollout/generate": _passthrough("RL rollout (msgpack answer)"),
        "/generate": _passthrough("Miles alias of /v1/images/generations"),
        "/generate_video": _passthrough("Miles alias of /v1/videos"),
    }
    return {"openapi": "3.1.0",
            "info": {"title": "dsrouter", "version": __version__,
                     "description": "Router for SGLang diffusion workers"},
            "paths": paths,
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
