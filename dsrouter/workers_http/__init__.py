"""The worker-facing layer: the only code that opens connections to workers.

Everything the router sends to a worker goes through `WorkerHTTP`: proxied requests (the
streaming keep-alive pools in `pool.py`), health and capability probes, RL control
broadcasts, model discovery, job lists and owner lookups, the launcher's readiness
checks, and the WebSockets of realtime sessions (`websocket.py`, on trio-websocket).
So `security.worker_api_key` (or a worker's own key) is attached in one place
(`WorkerHTTP.auth`), every broadcast or lookup bounds each worker by one deadline
(`fan_out`), and the health checker and the launcher read `/health` with one classifier
(`readiness.read_health`).
"""

from dsrouter.workers_http.calls import Answer, WorkerHTTP
from dsrouter.workers_http.fanout import fan_out
from dsrouter.workers_http.pool import InvalidRequest, UpstreamError, UpstreamResponse
from dsrouter.workers_http.readiness import HealthReading, ProbeOutcome
from dsrouter.workers_http.websocket import (
    CloseReason,
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
)

__all__ = [
    "Answer",
    "CloseReason",
    "ConnectionClosed",
    "ConnectionRejected",
    "HealthReading",
    "InvalidRequest",
    "ProbeOutcome",
    "UpstreamError",
    "UpstreamResponse",
    "WebSocketConnection",
    "WorkerHTTP",
    "fan_out",
]
