"""The worker record: one `Worker` per registered URL, its states and what it can serve.

This module only defines the record; the other modules of the package assign its fields
(see the package docstring for who owns which). Every field that can make a worker
(un)routable bumps its registry's `RoutingEpoch` when assigned, so the registry's cache of
routable workers knows when to rebuild without anyone having to remember to tell it.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Sequence
from typing import Any

import attrs

from dsrouter.speed import SpeedEstimate

IMAGE_ONLY_TASKS = frozenset({"T2I", "I2I", "TI2I"})
VIDEO_TASKS = frozenset({"T2V", "I2V", "TI2V", "V2V", "F2V"})


class Health(enum.Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    DEAD = "dead"


@attrs.frozen
class Capabilities:
    """What a worker can serve, read from `/model_info` and `/v1/models`."""

    model_id: str | None = None
    task_types: tuple[str, ...] = ()
    output_types: tuple[str, ...] = ()
    video_support: bool | None = None
    model_info: dict[str, Any] | None = None
    model_names: frozenset[str] = frozenset()
    """Every name a request's `model` may use for this worker: its `/v1/models` ids (the
    served model name) and roots, and its model path. Empty: not known (serves any)."""

    def serves(self, model: str) -> bool:
        return not self.model_names or model in self.model_names


def video_support_from(task_types: Sequence[str], output_types: Sequence[str]) -> bool | None:
    """Video-capable per SEEDS.md: any VIDEO output, else a first task outside the image set."""
    if output_types:
        return "VIDEO" in output_types
    if task_types:
        return any(t in VIDEO_TASKS for t in task_types) or task_types[0] not in IMAGE_ONLY_TASKS
    return None


class RoutingEpoch:
    """A counter one registry shares with its workers: bumped by every change that can make
    a worker (un)routable, so `Registry.routable` rebuilds its cache only when it must."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def bump(self) -> None:
        self.value += 1


def _routing_changed(instance: Worker, attribute: Any, value: Any) -> Any:
    instance.routing_epoch.bump()
    return value


@attrs.define(eq=False)
class Worker:
    url: str
    worker_id: str
    display_id: str
    routing_epoch: RoutingEpoch = attrs.field(factory=RoutingEpoch, repr=False)
    """Its registry's epoch (given by `Registry.add`)."""
    health: Health = attrs.field(default=Health.STARTING, on_setattr=_routing_changed)
    sleeping: bool = attrs.field(default=False, on_setattr=_routing_changed)
    draining: bool = attrs.field(default=False, on_setattr=_routing_changed)
    in_flight: int = 0
    realtime_sessions: int = 0
    """Open WebSocket sessions (a worker serves one at a time; each also counts in
    `in_flight`)."""
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    capabilities: Capabilities = attrs.field(factory=Capabilities, on_setattr=_routing_changed)
    last_error: str | None = None
    last_probe_at: float | None = None
    probe_latency_s: float | None = None
    requests_total: int = 0
    registered_at: float = attrs.Factory(time.time)
    managed: dict[str, Any] | None = None
    source: str = "api"
    """Who registered it: "api", "config" (router.toml / --worker-urls) or "launcher"."""
    api_key: str = ""
    quarantined_by_operator: bool = attrs.field(default=False, on_setattr=_routing_changed)
    remove_when_idle: bool = False
    opened_at: float = 0.0
    """When the breaker last opened (trio clock); a trial is allowed `breaker_open_s` later."""
    trial_in_flight: bool = attrs.field(default=False, on_setattr=_routing_changed)
    half_open_after: float = attrs.field(default=math.inf, on_setattr=_routing_changed)
    tripped_by_requests: bool = False
    """Dead because requests failed (the breaker), not probes: a worker can answer /health
    while its generations fail, so good probes alone must not close the breaker early."""
    weights: str | None = None
    """The weight version this worker last confirmed (None: its launch weights)."""
    stale: bool = attrs.field(default=False, on_setattr=_routing_changed)
    """A refit moved the pool past `weights`: not routable until caught up."""
    outstanding_cost: float = 0.0
    """Estimated work of the requests this worker is serving now (see `cost.py`)."""
    speed: SpeedEstimate = attrs.Factory(SpeedEstimate)
    last_completion_at: float = -math.inf
    work_started_at: float = 0.0
    """When the request at the head of this worker's FIFO began (predicted): set when the
    worker takes a request while idle and whenever one of its requests ends."""
    lease_costs: dict[int, float] = attrs.Factory(dict)
    """The estimated cost of each request in flight, by lease, oldest first: the worker runs
    them in that order, so the first is the one running since `work_started_at`."""

    @property
    def running_cost(self) -> float:
        """The estimated cost of the request this worker is running (0 when idle)."""
        return next(iter(self.lease_costs.values()), 0.0)

    @property
    def state(self) -> str:
        """One word for operators; draining, sleeping and stale win over the probe verdict."""
        if self.draining:
            return "draining"
        if self.sleeping:
            return "sleeping"
        if self.stale and self.health is Health.HEALTHY:
            return "stale"
        return self.health.value

    @property
    def routable(self) -> bool:
        return (
            self.health is Health.HEALTHY
            and not self.sleeping
            and not self.draining
            and not self.stale
        )

    @property
    def video_support(self) -> bool | None:
        return self.capabilities.video_support

    def to_json(self) -> dict[str, Any]:
        caps = self.capabilities
        return {
            "worker_id": self.worker_id,
            "display_id": self.display_id,
            "url": self.url,
            "state": self.state,
            "active_requests": self.in_flight,
            "realtime_sessions": self.realtime_sessions,
            "is_dead": self.health is Health.DEAD,
            "is_sleeping": self.sleeping,
            "is_draining": self.draining,
            "is_stale": self.stale,
            "weight_version": self.weights,
            "consecutive_failures": self.consecutive_failures,
            "consecutive_successes": self.consecutive_successes,
            "video_support": caps.video_support,
            "model": caps.model_id,
            "task_types": list(caps.task_types),
            "output_types": list(caps.output_types),
            "last_error": self.last_error,
            "last_probe_at": self.last_probe_at,
            "probe_latency_ms": None
            if self.probe_latency_s is None
            else round(self.probe_latency_s * 1000, 2),
            "requests_total": self.requests_total,
            "outstanding_cost": round(self.outstanding_cost, 3),
            "seconds_per_unit": self.speed.seconds_per_unit,
            "overhead_s": self.speed.overhead_s,
            "quarantined_by_operator": self.quarantined_by_operator,
            "source": self.source,
            "managed": self.managed is not None,
            **({"supervisor": self.managed} if self.managed is not None else {}),
        }
