"""The one shape of every error the router itself produces: `{"error": "..."}`."""

from __future__ import annotations

import logging
from typing import Any

from quart import Response, jsonify

log = logging.getLogger("dsrouter.api")


def error(status: int, message: str, **extra: Any) -> tuple[Response, int]:
    if status >= 500:
        log.warning("%d: %s", status, message)
    else:
        log.info("%d: %s", status, message)
    return jsonify({"error": message, **extra}), status
