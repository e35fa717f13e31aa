"""The Quart-Trio application: management, health, discovery and RL control routes.

Inference traffic never reaches Quart (see `frontend.py`): Quart buffers request bodies
without backpressure, which is fine for the JSON bodies handled here. Two limits bound that
buffering: RL control bodies up to `server.max_control_body_mb` (an
`update_weights_from_tensor` carries serialized tensors and can be large), everything else
(worker management, reload) up to `MANAGEMENT_BODY_LIMIT`.

Every error answer Quart makes itself (405, 413, 408, an unexpected 500...) is turned into
the router's one error shape, `{"error": "..."}` (`api/errors.py`), keeping its status and
headers (`Allow` on a 405).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from quart_trio.wrappers import TrioRequest
from werkzeug.exceptions import HTTPException, MethodNotAllowed, RequestEntityTooLarge

from dsrouter.api import discovery, ops, probes, rl, workers
from dsrouter.api.errors import error
from dsrouter.context import RouterContext
from dsrouter.control import PoolControl
from dsrouter.units import MiB

MANAGEMENT_BODY_LIMIT = 1 * MiB
"""Worker registration, `PUT /workers/{id}`, reload: a few small JSON fields at most."""


def create_app(context: RouterContext, control: PoolControl) -> QuartTrio:
    app = QuartTrio("dsrouter", static_folder=None)
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.config.update(
        DSROUTER=context,
        DSROUTER_CONTROL=control,
        MAX_CONTENT_LENGTH=MANAGEMENT_BODY_LIMIT,
        RESPONSE_TIMEOUT=None,
        BODY_TIMEOUT=context.config.server.request_timeout_s,
        JSON_SORT_KEYS=False,
        PROVIDE_AUTOMATIC_OPTIONS=False,
    )
    app.json.sort_keys = False
    app.register_blueprint(workers.bp)
    app.register_blueprint(discovery.bp)
    app.register_blueprint(rl.bp)
    app.register_blueprint(ops.bp)
    app.register_blueprint(probes.bp)
    control_paths = frozenset(
        rule.rule for rule in app.url_map.iter_rules() if rule.endpoint.startswith(f"{rl.bp.name}.")
    )

    def body_limit(path: str) -> int:
        if path in control_paths:
            return context.config.server.max_control_body_mb * MiB  # reload applies it
        return MANAGEMENT_BODY_LIMIT

    app.request_class = _request_class(body_limit)
    app.config["DSROUTER_BODY_LIMIT"] = body_limit
    app.register_error_handler(HTTPException, _http_error)
    return app


def _request_class(body_limit: Callable[[str], int]) -> type[TrioRequest]:
    """A request class whose body limit depends on the route.

    Quart fixes a request's body limit when it builds the request, before any handler or
    `before_request` hook runs, and the body is buffered concurrently from then on, so the
    limit has to be chosen here, from the path.
    """

    class BodyLimitedRequest(TrioRequest):
        def __init__(self, method: str, scheme: str, path: str, *args: Any, **kwargs: Any) -> None:
            limit = body_limit(path)
            kwargs["max_content_length"] = limit
            super().__init__(method, scheme, path, *args, **kwargs)
            self.max_content_length = limit

    return BodyLimitedRequest


async def _http_error(exc: HTTPException) -> tuple[Response, int]:
    """Quart's own errors, in the router's JSON shape instead of an HTML page."""
    status = exc.code or 500
    if isinstance(exc, RequestEntityTooLarge):
        limit = request.max_content_length or 0
        message = f"Request body exceeds the limit of {limit / MiB:g} MiB"
    elif isinstance(exc, MethodNotAllowed):
        allowed = ", ".join(sorted(exc.valid_methods or ()))
        message = f"Method {request.method} is not allowed on {request.path} (allowed: {allowed})"
    elif status >= 500:
        message = exc.name  # the traceback is in the log, not for the client
    else:
        message = f"{exc.name}: {exc.description}" if exc.description else exc.name
    headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
    return error(status, message, headers=headers)


def admin_paths(app: QuartTrio) -> tuple[frozenset[str], tuple[str, ...]]:
    """Exact paths and path prefixes that Quart serves; everything else is proxied."""
    exact: set[str] = set()
    prefixes: set[str] = set()
    for rule in app.url_map.iter_rules():
        text = rule.rule
        if "<" in text:
            prefixes.add(text.split("<", 1)[0])
        else:
            exact.add(text)
    return frozenset(exact), tuple(sorted(prefixes))
