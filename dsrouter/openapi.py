"""The OpenAPI 3.1 description of every route the router serves, served at `/openapi.json`.

Two kinds of route, described differently:

* Quart's routes (management, health, discovery, RL control, operator endpoints) are the
  router's own contract: described with their answers, so schema-driven fuzzers can
  exercise them. `tests/fuzz/test_api_properties.py` checks that every Quart rule is here.
* Inference routes go to the streaming proxy (`routes.py` decides where each goes): their
  bodies are the worker's contract (shared/WORKER_API.md), so they are described as
  pass-through, with the errors the router itself adds. Each carries `x-dsrouter-routing`,
  the `routes.Route.kind` it is classified as (pool, create, sticky, list); the same test
  checks that against `routes.classify`. Any other path is proxied to one worker as well.
* The router's own streams: job events (Server-Sent Events) and the WebSocket routes
  (marked `x-dsrouter-websocket`; any other WebSocket path is relayed to a worker too).
"""

from __future__ import annotations

from typing import Any

from dsrouter import __version__

_ERROR = {"type": "object", "properties": {"error": {"type": "string"}}, "required": ["error"]}
_WORKER = {
    "type": "object",
    "required": [
        "worker_id",
        "display_id",
        "url",
        "active_requests",
        "is_dead",
        "is_sleeping",
        "consecutive_failures",
        "video_support",
    ],
    "properties": {
        "worker_id": {"type": "string"},
        "display_id": {"type": "string"},
        "url": {"type": "string"},
        "state": {"type": "string"},
        "active_requests": {"type": "integer"},
        "is_dead": {"type": "boolean"},
        "is_sleeping": {"type": "boolean"},
        "is_draining": {"type": "boolean"},
        "consecutive_failures": {"type": "integer"},
        "video_support": {"type": ["boolean", "null"]},
        "managed": {"type": "boolean", "description": "launched by the router"},
        "supervisor": {"type": "object", "description": "launched workers only"},
    },
}
_SLOT = {
    "type": "object",
    "description": "one launcher slot, whatever its state (the registry holds a launched "
    "worker only while it is ready)",
    "required": [
        "index",
        "url",
        "worker_id",
        "state",
        "pid",
        "restarts",
        "last_exit",
        "log_file",
        "registered",
    ],
    "properties": {
        "index": {"type": "integer"},
        "url": {"type": "string"},
        "worker_id": {"type": "string"},
        "state": {"enum": ["new", "starting", "ready", "backoff", "failed", "stopped"]},
        "detail": {"type": "string", "description": "what it waits for, or why it failed"},
        "pid": {"type": ["integer", "null"], "description": "null while no process runs"},
        "restarts": {"type": "integer"},
        "last_exit": {"type": ["string", "null"]},
        "log_file": {"type": ["string", "null"]},
        "gpus": {"type": "array", "items": {"type": "string"}},
        "registered": {"type": "boolean", "description": "in `workers` (routable) now"},
    },
}
_WORKER_LIST = {
    "type": "object",
    "required": ["workers"],
    "properties": {
        "workers": {"type": "array", "items": _WORKER},
        "queued": {"type": "integer"},
        "target_version": {"type": ["string", "null"]},
        "pool_sleeping": {"type": "boolean"},
        "managed_workers": {"type": "array", "items": _SLOT},
    },
}
_URL_BODY = {
    "type": "object",
    "properties": {"url": {"type": "string"}, "worker_url": {"type": "string"}},
}
_RESULTS = {
    "type": "object",
    "properties": {
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "worker_url": {"type": "string"},
                    "status_code": {"type": ["integer", "null"]},
                    "body": {},
                },
            },
        }
    },
}
_RELOAD = {
    "type": "object",
    "properties": {
        "status": {"enum": ["reloaded", "rejected"]},
        "errors": {"type": "array", "items": {"type": "string"}},
        "workers_added": {"type": "array", "items": {"type": "string"}},
        "workers_removed": {"type": "array", "items": {"type": "string"}},
        "needs_restart": {"type": "array", "items": {"type": "string"}},
        "rolling_restart": {"type": "array", "items": {"type": "integer"}},
        "security_weakened": {"type": "array", "items": {"type": "string"}},
    },
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _answers(ok: dict[str, Any], *errors: int) -> dict[str, Any]:
    answers: dict[str, Any] = {"200": {"description": "OK", **_json(ok)}}
    for code in errors:
        answers[str(code)] = {"description": "error", **_json(_ERROR)}
    return answers


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _control(summary: str, method: str = "post") -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": _answers(_RESULTS, 401, 503)}
    if method == "post":
        operation["requestBody"] = {"required": False, **_json({"type": "object"})}
    return {method: operation}


def _passthrough(summary: str, routing: str, *methods: str) -> dict[str, Any]:
    """Proxied operations: the worker's answer streamed back, or one of the router's errors."""
    return {
        method: {
            "summary": f"{summary} (proxied to a worker, streamed)",
            "x-dsrouter-routing": routing,
            "responses": {
                "200": {"description": "the worker's answer"},
                "404": {"description": "unknown job id (sticky routes)", **_json(_ERROR)},
                "502": {"description": "worker unreachable", **_json(_ERROR)},
                "503": {"description": "no routable worker", **_json(_ERROR)},
                "504": {"description": "worker too slow", **_json(_ERROR)},
            },
        }
        for method in methods or ("post",)
    }


def _job_routes(kind: str, noun: str) -> dict[str, Any]:
    """`/v1/videos` or `/v1/meshes`: create and list, then status/delete and content by id."""
    param = [_path_param(f"{noun}_id", f"the {noun} job id (sticky to its worker)")]
    return {
        f"/v1/{kind}": {
            **_passthrough(f"create a {noun} job", "create", "post"),
            **_passthrough(
                f"{noun} jobs of every suitable worker, merged; with "
                f"?{noun}_id=, ?id= or ?job_id= one job's status",
                "list",
                "get",
            ),
        },
        f"/v1/{kind}/{{{noun}_id}}": {
            "parameters": param,
            **_passthrough(f"{noun} job status or deletion", "sticky", "get", "delete"),
        },
        f"/v1/{kind}/{{{noun}_id}}/content": {
            "parameters": param,
            **_passthrough(f"{noun} file", "sticky", "get"),
        },
    }


def _websocket(summary: str) -> dict[str, Any]:
    """A WebSocket route (`realtime.py`): described as its upgrade request."""
    return {
        "get": {
            "summary": f"{summary} (WebSocket, relayed to one worker)",
            "x-dsrouter-websocket": True,
            "description": "Upgrade with `Upgrade: websocket`; messages are relayed both "
            "ways unchanged. One session per worker: with none free the router sends the "
            "worker's own refusal (an error message, then close code 1008), or waits up to "
            '`realtime.wait_s` (`realtime.when_busy = "wait"`). Close codes: the peer\'s, '
            "1001 for idle, lifetime and drain, 1011 when the worker is lost.",
            "responses": {
                "101": {"description": "switching protocols: the session is open"},
                "401": {"description": "missing or invalid API key", **_json(_ERROR)},
                "503": {"description": "the router is draining", **_json(_ERROR)},
            },
        }
    }


def _events() -> dict[str, Any]:
    """`GET /v1/videos/{id}/events`, served by the router (`events.py`), not proxied."""
    return {
        "parameters": [_path_param("video_id", "the video job id")],
        "get": {
            "summary": "the job's status and progress as Server-Sent Events, until it "
            "completes or fails",
            "description": "Each change is `event: <status>` with the job object as `data`; "
            "the stream ends after `completed` or `failed`, or with `event: error` when the "
            "job or its worker is gone. The router polls the job's worker every "
            "`realtime.events_poll_s`, once per job for all listeners.",
            "responses": {
                "200": {"description": "the event stream", "content": {"text/event-stream": {}}},
                "404": {"description": "unknown video id", **_json(_ERROR)},
            },
        },
    }


def _inference() -> dict[str, Any]:
    return {
        "/v1/images/generations": _passthrough("text to image", "create"),
        "/v1/images/edits": _passthrough("image edit (multipart)", "create"),
        "/v1/images/{image_id}/content": {
            "parameters": [_path_param("image_id", "an image id from a `url` answer")],
            **_passthrough("stored image bytes (sticky)", "sticky", "get"),
        },
        "/v1/diffusion/generate": _passthrough("native diffusion generation", "pool"),
        "/rollout/generate": _passthrough("RL rollout (msgpack answer)", "pool"),
        **_job_routes("videos", "video"),
        **_job_routes("meshes", "mesh"),
        "/generate": _passthrough("Miles alias of /v1/images/generations", "create"),
        "/generate_video": _passthrough("Miles alias of /v1/videos", "create"),
        "/v1/model_info": _passthrough("the worker's model path", "pool", "get"),
        "/model_info": _passthrough("the worker's model and task types", "pool", "get"),
        "/server_info": _passthrough("the worker's server settings", "pool", "get"),
        "/vertex_generate": _passthrough("Vertex AI predict shape", "pool"),
        "/v1/videos/{video_id}/events": _events(),
        "/v1/realtime_video/generate": _websocket("streaming world-model video (msgpack)"),
        "/v1/actions/realtime": _websocket("action loop of a VLA pipeline (msgpack)"),
        "/openpi/policy": _websocket("OpenPI-compatible policy server (msgpack)"),
    }


def build_openapi() -> dict[str, Any]:
    paths: dict[str, Any] = {
        "/health": {
            "get": {
                "summary": "router health",
                "responses": {
                    "200": {"description": "a routable worker exists", **_json({"type": "object"})},
                    "503": {
                        "description": "none (status unhealthy), starting or draining",
                        **_json({"type": "object"}),
                    },
                },
            }
        },
        "/livez": {
            "get": {
                "summary": "liveness: the process serves (200 also while starting, draining "
                "or asleep); point liveness probes here",
                "responses": _answers({"type": "object"}),
            }
        },
        "/readyz": {
            "get": {
                "summary": "readiness: a request sent now can be routed; point load "
                "balancers and readiness probes here",
                "responses": {
                    "200": {"description": "ready", **_json({"type": "object"})},
                    "503": {
                        "description": "starting, draining, asleep or no routable worker "
                        "(`reason` says which)",
                        **_json({"type": "object"}),
                    },
                },
            }
        },
        "/": {
            "get": {
                "summary": "what this is: name, version, where the docs and probes are",
                "responses": _answers({"type": "object"}),
            }
        },
        "/workers": {
            "get": {
                "summary": "list workers, and every launcher slot in any state",
                "responses": _answers(_WORKER_LIST, 401),
            },
            "post": {
                "summary": "register a worker",
                "parameters": [{"name": "url", "in": "query", "schema": {"type": "string"}}],
                "requestBody": {"required": False, **_json(_URL_BODY)},
                "responses": _answers({"type": "object"}, 400, 401),
            },
        },
        "/workers/{worker_id}": {
            "parameters": [_path_param("worker_id", "the worker URL, percent-encoded")],
            "get": {
                "summary": "one worker",
                "responses": _answers(
                    {"type": "object", "properties": {"worker": _WORKER}}, 400, 401, 404
                ),
            },
            "put": {
                "summary": "quarantine, recover, drain, refresh capabilities",
                "requestBody": {
                    "required": True,
                    **_json(
                        {
                            "type": "object",
                            "additionalProperties": False,
                            "minProperties": 1,
                            "properties": {
                                "is_dead": {"type": "boolean"},
                                "refresh_video_support": {"type": "boolean"},
                                "draining": {"type": "boolean"},
                                "remove_when_drained": {"type": "boolean"},
                            },
                        }
                    ),
                },
                "responses": _answers({"type": "object"}, 400, 401, 404),
            },
            "delete": {
                "summary": "deregister",
                "responses": _answers({"type": "object"}, 400, 401, 404),
            },
        },
        "/add_worker": {
            "post": {
                "summary": "Miles alias of POST /workers",
                "parameters": [{"name": "url", "in": "query", "schema": {"type": "string"}}],
                "responses": _answers({"type": "object"}, 400, 401),
            }
        },
        "/remove_worker": {
            "post": {
                "summary": "Miles alias of DELETE /workers/{worker_id} (URL as for /add_worker)",
                "parameters": [{"name": "url", "in": "query", "schema": {"type": "string"}}],
                "responses": _answers({"type": "object"}, 400, 401, 404),
            }
        },
        "/list_workers": {
            "get": {"summary": "Miles: worker URLs", "responses": _answers({"type": "object"}, 401)}
        },
        "/health_workers": {
            "get": {
                "summary": "Miles: per-worker health",
                "responses": _answers({"type": "object"}, 401),
            }
        },
        "/v1/models": {
            "get": {
                "summary": "models of the pool, merged",
                "responses": _answers({"type": "object"}, 502, 503),
            }
        },
        "/v1/models/{model}": {
            "parameters": [
                _path_param("model", "a served model name or model path (may contain `/`)")
            ],
            "get": {
                "summary": "one card of the merged model list",
                "responses": _answers({"type": "object"}, 404, 502, 503),
            },
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {"200": {"description": "text exposition format"}},
            }
        },
        "/status": {
            "get": {
                "summary": "the pool at a glance for a browser (HTML, refreshes itself); "
                "guarded like /metrics",
                "responses": {
                    "200": {"description": "an HTML page"},
                    "401": {"description": "unauthorized"},
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "this document", "responses": _answers({"type": "object"})}
        },
        "/admin/reload": {
            "post": {
                "summary": "re-read router.toml (as SIGHUP); 400 keeps the running configuration",
                "responses": {
                    "200": {"description": "applied", **_json(_RELOAD)},
                    "400": {
                        "description": "rejected, with one error per problem",
                        **_json(_RELOAD),
                    },
                    "401": {"description": "error", **_json(_ERROR)},
                },
            }
        },
        "/admin/config": {
            "get": {
                "summary": "the effective configuration, secrets masked",
                "responses": _answers({"type": "object"}, 401),
            }
        },
        "/update_weights_from_disk": _control("refit every active worker from disk"),
        "/update_weights_from_tensor": _control("refit from tensors (co-located trainer)"),
        "/get_weights_checksum": _control("per-worker weight checksums"),
        "/update_weights_from_tensor_checker": _control(
            "check every worker's tensors against the trainer's hashes"
        ),
        "/release_memory_occupation": _control("put the pool to sleep"),
        "/resume_memory_occupation": _control("wake the pool"),
        "/v1/set_lora": _control("load or activate a LoRA on every worker"),
        "/v1/merge_lora_weights": _control("merge LoRA weights on every worker"),
        "/v1/unmerge_lora_weights": _control("unmerge LoRA weights on every worker"),
        "/v1/list_loras": _control("LoRA status of every active worker", "get"),
        **_inference(),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "dsrouter",
            "version": __version__,
            "description": "Router for SGLang diffusion workers. Paths not listed "
            "here are proxied to one routable worker.",
        },
        "paths": paths,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
