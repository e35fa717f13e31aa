"""The Quart-Trio application: management, health, discovery and RL control routes.

Inference traffic never reaches Quart (see `frontend.py`): Quart buffers request bodies
without backpressure, which is fine for the small JSON bodies handled here.
"""

from __future__ import annotations

from quart_trio import QuartTrio

from dsrouter.api import discovery, ops, rl, workers
from dsrouter.context import RouterContext
from dsrouter.control import PoolControl

ADMIN_BODY_LIMIT = 64 * 1024 * 1024


def create_app(context: RouterContext, control: PoolControl) -> QuartTrio:
    app = QuartTrio("dsrouter", static_folder=None)
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    app.config.update(
        DSROUTER=context,
        DSROUTER_CONTROL=control,
        MAX_CONTENT_LENGTH=ADMIN_BODY_LIMIT,
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
    return app


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
