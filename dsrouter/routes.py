"""Which inference path goes where: a pure function from (method, path, query) to a `Route`.

Kept apart from the proxy so the routing table can be read (and tested) in one place.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs

import attrs

POOL = "pool"  # any suitable routable worker
CREATE = "create"  # a job-creating POST: learn the id from the answer
STICKY = "sticky"  # the worker that owns `job_id`
LIST = "list"  # merged list over every suitable worker

_JOB_PATH = re.compile(r"^/v1/(videos|meshes)/([^/]+)(/content)?$")
_IMAGE_CONTENT = re.compile(r"^/v1/images/([^/]+)/content$")
_ALIASES = {"/generate": "/v1/images/generations", "/generate_video": "/v1/videos"}
_KIND_OUTPUT = {"videos": "VIDEO", "meshes": "MESH", "images": "IMAGE"}
_IMAGE_POSTS = frozenset({"/v1/images/generations", "/v1/images/edits"})
SYNCHRONOUS_GENERATIONS = frozenset({*_IMAGE_POSTS, "/rollout/generate", "/v1/diffusion/generate"})
"""Routes whose answer arrives when the GPU work is done: their latency teaches speed."""


@attrs.frozen
class Route:
    kind: str
    path: str
    """The path sent to the worker (Miles aliases rewritten)."""
    output: str | None = None
    """The output type a worker must produce (IMAGE, VIDEO, MESH), if any."""
    job_kind: str | None = None
    job_id: str | None = None


def classify(method: str, path: str, query_string: bytes) -> Route:
    path = _ALIASES.get(path, path) if method == "POST" else path
    if method == "POST" and path in _IMAGE_POSTS:
        return Route(CREATE, path, "IMAGE", "images")
    if path in ("/v1/videos", "/v1/meshes"):
        kind = path.rsplit("/", 1)[1]
        if method == "POST":
            return Route(CREATE, path, _KIND_OUTPUT[kind], kind)
        if method == "GET":
            job_id = _id_from_query(query_string)
            if job_id is not None:
                # sglang-d-router sent this, query and all, to the job's worker, which
                # answers with its own job list: the shape its clients parse (MIGRATING.md).
                return Route(STICKY, path, _KIND_OUTPUT[kind], kind, job_id)
            return Route(LIST, path, _KIND_OUTPUT[kind], kind)
    match = _JOB_PATH.match(path)
    if match:
        kind = match.group(1)
        return Route(STICKY, path, _KIND_OUTPUT[kind], kind, match.group(2))
    match = _IMAGE_CONTENT.match(path)
    if match and method == "GET":
        return Route(STICKY, path, "IMAGE", "images", match.group(1))
    return Route(POOL, path)


def _id_from_query(query_string: bytes) -> str | None:
    query = parse_qs(query_string.decode("latin-1"))
    for key in ("video_id", "id", "job_id"):
        if query.get(key):
            return query[key][0]
    return None


_LABELS = frozenset(
    {
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/videos",
        "/v1/meshes",
        "/rollout/generate",
        "/v1/diffusion/generate",
        "/vertex_generate",
        "/v1/model_info",
        "/model_info",
        "/server_info",
    }
)


def label(route: Route) -> str:
    """A bounded-cardinality name for metrics: ids become `{id}`, unknown paths `other`."""
    if route.job_id is not None and route.path != f"/v1/{route.job_kind}":
        suffix = "/content" if route.path.endswith("/content") else ""
        return f"/v1/{route.job_kind}/{{id}}{suffix}"
    if route.path in _LABELS:
        return route.path
    if route.path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"
