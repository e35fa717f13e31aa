"""Request targets: the one path the router judges a request by is the path a worker sees.

The frontend decides "admin route or proxied" from the path, and the proxy forwards the raw
target. If the two could disagree, a request the router judged harmless could reach a
worker's control handler with the router's `worker_api_key` attached: an absolute-form
target (`POST http://x/release_memory_occupation`) or one with a fragment
(`/update_weights_from_disk#x`) is reduced to its path by the HTTP parsers real workers use
(uvicorn with httptools), and a worker behind a proxy that merges slashes or resolves dot
segments maps `//update_weights_from_disk` or `/v1/../update_weights_from_disk` onto it too.

So `check_target` runs before anything else looks at a request: it refuses fragments, dot
segments and absolute-form targets naming another authority; reduces an absolute-form target
naming the router to origin form; and returns the canonical form of the path (slashes merged,
no trailing slash) that the frontend classifies by. `WORKER_INTERNAL` lists what workers
serve for their own operators: never proxied.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import attrs

from dsrouter.access import Scope

WORKER_INTERNAL_PREFIXES = ("/_sim/",)
"""Worker routes for the worker's own operator (the simulated worker's state and fault
switches): no client of the router has business there."""
_ABSOLUTE = re.compile(rb"^(https?)://([^/?#]*)(.*)$", re.IGNORECASE)
_SLASHES = re.compile(r"/{2,}")


class BadTarget(Exception):
    """A request target the router refuses (400); the message is safe to show."""


@attrs.frozen
class Target:
    canonical: str
    """The decoded path with repeated slashes merged and no trailing slash: what the
    frontend classifies, whatever spelling a worker (or a proxy before it) would reduce."""
    scope: Scope
    """The scope to serve: the original one, or a copy in origin form."""


def canonical_path(path: str) -> str:
    merged = _SLASHES.sub("/", path)
    return merged.rstrip("/") or "/"


def is_worker_internal(canonical: str) -> bool:
    return canonical.startswith(WORKER_INTERNAL_PREFIXES) or canonical + "/" in (
        WORKER_INTERNAL_PREFIXES
    )


def check_target(scope: Scope) -> Target:
    """Validate the request target of an HTTP or WebSocket scope; see the module docstring."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    if b"#" in raw or b"#" in scope.get("query_string", b""):
        raise BadTarget("request target must not contain a fragment ('#')")
    if not raw.startswith(b"/"):
        scope = _origin_form(scope, raw)
        raw = scope["raw_path"]
    path: str = scope["path"]
    segments = path.split("/")
    if "." in segments or ".." in segments:
        raise BadTarget("request path must not contain '.' or '..' segments")
    return Target(canonical_path(path), scope)


def _origin_form(scope: Scope, raw: bytes) -> Scope:
    """Reduce an absolute-form target that names this router; refuse any other form.

    The authority must be the `Host` the client sent (or the address it connected to):
    a proxy request for another origin is not ours to forward.
    """
    match = _ABSOLUTE.match(raw)
    if match is None:
        raise BadTarget("request target must be a path starting with '/'")
    authority = match.group(2).lower()
    host_header = _host_header(scope)
    ours = {host_header}
    server = scope.get("server")
    if server:
        host, port = server[0], server[1]
        ours.add((f"[{host}]" if ":" in host else host).encode() + b":%d" % port)
        if host_header and not host_header.endswith(b"]") and b":" not in host_header:
            ours.add(host_header + b":%d" % port)
    if not authority or authority not in ours:
        raise BadTarget("absolute-form request target names another host than this router")
    path = match.group(3) or b"/"
    if not path.startswith(b"/"):
        raise BadTarget("request target must be a path starting with '/'")
    return {**scope, "raw_path": path, "path": unquote(path.decode("ascii"))}


def _host_header(scope: Scope) -> bytes:
    for key, value in scope["headers"]:
        if key == b"host":
            return value.lower()
    return b""
