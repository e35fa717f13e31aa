"""The one shape of every error the router itself produces: `{"error": "..."}`."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from quart import Response, jsonify

log = logging.getLogger("dsrouter.api")


def error(
    status: int, message: str, *, headers: Iterable[tuple[str, str]] = (), **extra: Any
) -> tuple[Response, int]:
    """The JSON error answer; `extra` adds fields to the body, `headers` to the response."""
    if status >= 500:
        log.warning("%d: %s", status, message)
    else:
        log.info("%d: %s", status, message)
    response = jsonify({"error": message, **extra})
    for name, value in headers:
        response.headers[name] = value
    return response, status
