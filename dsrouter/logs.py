"""Logging set-up: readable text on a terminal, JSON lines for services.

With `logging.format = "json"` every line the router writes is one JSON object: log records
(tracebacks in `exc`), Python warnings, hypercorn's own messages (logger `dsrouter.http`),
and the start-up announcements on stdout (`announce`).
"""

from __future__ import annotations

import json
import logging
import sys
import time

from dsrouter.config import LoggingConfig, LogLevel

HTTP_LOGGER = "dsrouter.http"
"""hypercorn's error log: its messages are the router's own HTTP server speaking."""
ANNOUNCE_LOGGER = "dsrouter.announce"
"""Start-up lines on stdout that scripts and tests wait for (`dsrouter listening on URL`)."""
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access lines also carry their fields as keys, so a log
    pipeline can filter on status or worker without parsing the message."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "access", None)
        if fields is not None:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class _NotRunningOn(logging.Filter):
    """hypercorn's "Running on ... (CTRL + C to quit)": the announcement says it already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Running on ")


def announce(message: str) -> None:
    """Write a start-up line to stdout (as JSON in JSON mode) and nowhere else."""
    logging.getLogger(ANNOUNCE_LOGGER).info(message)


def python_level(level: LogLevel) -> int:
    """The `logging` level of a configured one. `trace` is accepted because sglang-d-router
    passed `--log-level` to uvicorn, which knows it; nothing here logs below DEBUG."""
    return logging.DEBUG if level == "trace" else logging.getLevelName(level.upper())


def setup_logging(config: LoggingConfig) -> None:
    json_lines = config.format == "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(python_level(config.level))
    stdout = logging.StreamHandler(sys.stdout)
    stdout.setFormatter(JsonFormatter() if json_lines else logging.Formatter("%(message)s"))
    announcements = logging.getLogger(ANNOUNCE_LOGGER)
    announcements.handlers[:] = [stdout]
    announcements.propagate = False
    announcements.setLevel(logging.INFO)
    http = logging.getLogger(HTTP_LOGGER)
    http.filters[:] = [_NotRunningOn()]
    logging.captureWarnings(True)
    for noisy in ("httpx", "httpcore", "hypercorn.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
