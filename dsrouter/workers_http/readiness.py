"""What a worker's `GET /health` answer means (WORKER_API.md §2), for the health checker
and the launcher alike.

A closed port is a worker still loading (or gone); 503 with an empty body is warming up;
200 is ready; 503 `{"status": "unhealthy", "error": ...}` is the worker reporting its own
failure (a dead scheduler): the launcher stops waiting at once, the checker counts a
failure.
"""

from __future__ import annotations

import enum
import json

import attrs

DETAIL_LIMIT = 200


class ProbeOutcome(enum.Enum):
    OK = "ok"
    REFUSED = "refused"  # nothing listens: still loading, or gone
    WARMING = "warming"  # 503 with an empty body: up, warming up
    FAILED = "failed"  # unhealthy answer, timeout, protocol error


@attrs.frozen
class HealthReading:
    outcome: ProbeOutcome
    detail: str | None = None
    """Why it is not OK, for logs, `last_error` and the launcher's progress line."""
    latency_s: float | None = None
    reported_error: str | None = None
    """The worker's own error from a 503 `{"status": "unhealthy"}` answer."""


def read_health(status: int, body: bytes, latency_s: float) -> HealthReading:
    """Classify one answer to `GET /health` (`body` may be cut short)."""
    if status == 200:
        return HealthReading(ProbeOutcome.OK, latency_s=latency_s)
    if status == 503 and not body:
        return HealthReading(ProbeOutcome.WARMING, "warming up (503)", latency_s)
    reported = _reported_error(body) if status == 503 else None
    detail = body[:DETAIL_LIMIT].decode(errors="replace")
    return HealthReading(
        ProbeOutcome.FAILED, f"/health answered {status}: {detail}", latency_s, reported
    )


def unanswered(detail: str, *, connect: bool) -> HealthReading:
    """No answer: nothing listens (`connect`), or the exchange failed or timed out."""
    return HealthReading(ProbeOutcome.REFUSED if connect else ProbeOutcome.FAILED, detail)


def _reported_error(body: bytes) -> str | None:
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if isinstance(payload, dict) and payload.get("status") == "unhealthy":
        return str(payload.get("error") or "unhealthy")
    return None
