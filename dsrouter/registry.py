"""The registry: the single owner of worker state and in-flight counts.

Invariant: every mutation of a `Worker` happens inside a synchronous method of `Registry`
(or of `Lease`, which calls back into it). Trio switches tasks only at `await`, so each such
method runs atomically with respect to every other task: request handlers, health probes and
the launcher can call them freely without locks, and no count can be observed half-updated.
Code outside this module reads `Worker` fields but never assigns them.

The registry task (`Registry.run`) owns the background work the registry itself triggers:
capability probes after a worker registers, becomes healthy or recovers, and weight catch-up
of workers that are stale (they missed a refit, or recovered and may have restarted).

Weights: once a refit has set the pool's target version, a worker whose confirmed version
differs is `stale` and not routable, so no request is ever served by weights the trainer
has moved past.
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import attrs
import trio

from dsrouter.config import HealthConfig, RoutingConfig
from dsrouter.jobs import JobMap
from dsrouter.policies import SAMPLE_ABOVE, Policy
from dsrouter.speed import SpeedEstimate, pool_median
from dsrouter.urls import display_id_for, normalize_worker_url, worker_id_for
from dsrouter.workers_http.readiness import ProbeOutcome

log = logging.getLogger("dsrouter.registry")

IMAGE_ONLY_TASKS = frozenset({"T2I", "I2I", "TI2I"})
VIDEO_TASKS = frozenset({"T2V", "I2V", "TI2V", "V2V", "F2V"})


class Health(enum.Enum):
    STARTING = "starting"
    HEALTHY = "healthy"
    DEAD = "dead"


class NoWorkerAvailable(Exception):
    """No worker satisfies the request right now; the message is safe to show to a client."""


DISPATCH_DEPTH = 64
"""How far into the router queue one dispatch looks for a request the freed worker suits:
bounded so that a release costs the same with ten thousand requests queued."""
QUEUE_RECHECK_S = 0.25


class QueueFull(Exception):
    """The router queue is at `routing.queue_size`: the client should retry later (429)."""


class QueueTimeout(Exception):
    """A request waited `routing.queue_timeout_s` without a worker freeing up (503)."""


ASLEEP_RETRY_AFTER_S = 10
"""The Retry-After of every "pool is asleep" answer (inference and discovery alike)."""


class PoolAsleep(Exception):
    """Every worker sleeps (released its GPU memory); the client should come back (503)."""


@attrs.frozen
class Capabilities:
    """What a worker can serve, read from `/model_info` and `/v1/models`."""

    model_id: str | None = None
    task_types: tuple[str, ...] = ()
    output_types: tuple[str, ...] = ()
    video_support: bool | None = None
    model_info: dict[str, Any] | None = None


_ROUTING_EPOCH = [0]
"""Bumped by every change that can make a worker (un)routable; see `Registry.routable`."""


def _routing_changed(instance: Any, attribute: Any, value: Any) -> Any:
    _ROUTING_EPOCH[0] += 1
    return value


@attrs.define(eq=False)
class Worker:
    url: str
    worker_id: str
    display_id: str
    health: Health = attrs.field(default=Health.STARTING, on_setattr=_routing_changed)
    sleeping: bool = attrs.field(default=False, on_setattr=_routing_changed)
    draining: bool = attrs.field(default=False, on_setattr=_routing_changed)
    in_flight: int = 0
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
            "quarantined_by_operator": self.quarantined_by_operator,
            "source": self.source,
            "managed": self.managed is not None,
            **({"supervisor": self.managed} if self.managed is not None else {}),
        }


class Lease:
    """One request's claim on a worker. Released exactly once, however the request ends."""

    __slots__ = ("_registry", "cost", "released", "trial", "worker")

    def __init__(self, registry: Registry, worker: Worker, cost: float) -> None:
        self._registry = registry
        self.worker = worker
        self.cost = cost
        self.released = False
        self.trial = False
        """True when this request is the half-open breaker's one trial."""

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._registry._release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


CapabilityProber = Callable[[str], Awaitable[Capabilities | None]]
CatchUp = Callable[[str], Awaitable[None]]


class _Pause:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def __enter__(self) -> None:
        self.registry._paused += 1

    def __exit__(self, *exc_info: object) -> None:
        self.registry._paused -= 1
        self.registry._notify()


@attrs.define(eq=False)
class _Waiter:
    """A request queued in the router until a worker has room (late binding)."""

    accept: Callable[[Worker], bool] | None
    exclude: frozenset[int]
    cost: float
    event: trio.Event = attrs.Factory(trio.Event)
    lease: Lease | None = None


class Registry:
    def __init__(
        self,
        health: HealthConfig,
        policy: Policy,
        *,
        routing: RoutingConfig | None = None,
        max_jobs: int = 100_000,
        default_spu: float = 0.01,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        self.health_config = health
        self.routing = routing or RoutingConfig()
        self.policy = policy
        self.clock = clock
        self.default_spu = default_spu
        self._spu_cache: float | None = None
        self._queue: list[tuple[int, int, _Waiter]] = []
        self._seq = itertools.count()
        self.probe_counts: collections.Counter[str] = collections.Counter()
        self.transition_counts: collections.Counter[str] = collections.Counter()
        self.jobs = JobMap(max_jobs)
        self._workers: dict[str, Worker] = {}
        self._refresh_send, self._refresh_receive = trio.open_memory_channel[tuple[str, str]](
            math.inf
        )
        self._refreshes: dict[str, trio.Event] = {}
        self._catching_up: set[str] = set()
        self.changed = trio.Event()
        self.control_lock = trio.Lock()
        """Held by every control broadcast and catch-up, so they never interleave."""
        self.target_version: str | None = None
        self.pool_sleeping = False
        self._paused = 0
        self._routable: dict[Callable[[Worker], bool] | None, list[Worker]] = {}
        self._routable_epoch = -1
        self._routable_until = math.inf

    # ---- reading -------------------------------------------------------------------------

    def workers(self) -> list[Worker]:
        return list(self._workers.values())

    def by_url(self, url: str) -> Worker | None:
        return self._workers.get(url)

    def by_id(self, worker_id_or_url: str) -> Worker | None:
        """Find a worker by its decoded `worker_id` (a URL, normalised or not)."""
        worker = self._workers.get(worker_id_or_url)
        if worker is None:
            try:
                worker = self._workers.get(normalize_worker_url(worker_id_or_url))
            except ValueError:
                return None
        return worker

    def routable(self, accept: Callable[[Worker], bool] | None = None) -> list[Worker]:
        """Workers a request may go to: healthy ones, plus half-open ones awaiting a trial.

        Cached: with a thousand workers a scan per request was the main routing cost. The
        cache is rebuilt when a routing-relevant field changes (`_ROUTING_EPOCH`), when
        membership changes, or when a breaker's half-open time comes. The list is shared:
        callers must not mutate it. `accept` should be a long-lived function (see
        `proxy.accept_for`); a few distinct ones are cached per rebuild.
        """
        if self._routable_epoch != _ROUTING_EPOCH[0] or (
            self._routable_until != math.inf and self.clock() >= self._routable_until
        ):
            self._rebuild_routable()
        cached = self._routable.get(accept)
        if cached is None:
            cached = [w for w in self._routable[None] if accept is None or accept(w)]
            if len(self._routable) < 8:
                self._routable[accept] = cached
        return cached

    def _rebuild_routable(self) -> None:
        base: list[Worker] = []
        until = math.inf
        now: float | None = None
        for w in self._workers.values():
            if w.routable:
                base.append(w)
            elif (
                w.health is Health.DEAD
                and not w.quarantined_by_operator
                and not w.trial_in_flight
                and not w.sleeping
                and not w.draining
                and w.half_open_after != math.inf
            ):
                now = self.clock() if now is None else now
                if now >= w.half_open_after:
                    base.append(w)
                else:
                    until = min(until, w.half_open_after)
        self._routable = {None: base}
        self._routable_epoch = _ROUTING_EPOCH[0]
        self._routable_until = until

    def _half_open(self, worker: Worker) -> bool:
        """Dead by faults (not by an operator) long enough to deserve one trial request."""
        return (
            worker.health is Health.DEAD
            and not worker.quarantined_by_operator
            and self.clock() >= worker.half_open_after
        )

    def summary(self) -> dict[str, int]:
        workers = self._workers.values()
        return {
            "healthy_workers": sum(1 for w in workers if w.routable),
            "total_workers": len(self._workers),
            "dead_workers": sum(1 for w in workers if w.health is Health.DEAD),
            "sleeping_workers": sum(1 for w in workers if w.sleeping),
            "draining_workers": sum(1 for w in workers if w.draining),
            "starting_workers": sum(1 for w in workers if w.health is Health.STARTING),
            "in_flight": sum(w.in_flight for w in workers),
            "queued": len(self._queue),
            "stale_workers": sum(1 for w in workers if w.stale),
        }

    # ---- membership ----------------------------------------------------------------------

    def add(
        self,
        url: str,
        *,
        managed: dict[str, Any] | None = None,
        api_key: str = "",
        source: str = "api",
    ) -> tuple[Worker, bool]:
        """Register `url` (already normalised); returns the worker and whether it is new."""
        existing = self._workers.get(url)
        if existing is not None:
            return existing, False
        worker = Worker(
            url=url,
            worker_id=worker_id_for(url),
            display_id=display_id_for(url),
            managed=managed,
            api_key=api_key,
            source="launcher" if managed is not None else source,
        )
        self._workers[url] = worker
        _ROUTING_EPOCH[0] += 1
        log.info("worker %s registered", worker.display_id)
        self._notify()
        return worker, True

    def remove(self, url: str) -> Worker | None:
        worker = self._workers.pop(url, None)
        _ROUTING_EPOCH[0] += 1
        if worker is not None:
            forgotten = self.jobs.forget_worker(url)
            log.info("worker %s removed (%d job ids forgotten)", worker.display_id, forgotten)
            self._notify()
        return worker

    def update_managed(self, url: str, info: dict[str, Any]) -> None:
        worker = self._workers.get(url)
        if worker is not None:
            worker.managed = info

    # ---- leases --------------------------------------------------------------------------

    def lease(
        self,
        accept: Callable[[Worker], bool] | None = None,
        exclude: Iterable[Worker] = (),
        cost: float = 1.0,
    ) -> Lease:
        """Pick a routable worker now, ignoring per-worker limits and the queue."""
        excluded = frozenset(map(id, exclude))
        candidates = [w for w in self.routable(accept) if id(w) not in excluded]
        if not candidates:
            raise NoWorkerAvailable("No healthy workers available in the pool")
        return self.lease_worker(self._choose(candidates, cost), cost)

    async def acquire(
        self,
        accept: Callable[[Worker], bool] | None = None,
        exclude: Iterable[Worker] = (),
        cost: float = 1.0,
        priority: int = 0,
    ) -> Lease:
        """A lease on the best worker with room, waiting in the router queue if none has.

        FIFO within a priority (higher first). A waiter that is cancelled (client gone,
        queue timeout) leaves the queue at once, and a lease handed to it in the meantime is
        released, so no slot is lost.
        """
        excluded = frozenset(map(id, exclude))
        if not self._candidates(accept, excluded, limit=False) and not self._paused:
            if self.pool_sleeping and not self.routing.queue_while_asleep:
                raise PoolAsleep("pool is asleep")
            if not self.pool_sleeping:
                raise NoWorkerAvailable("No healthy workers available in the pool")
        if not self._queue:
            worker, _ = self._place(accept, excluded, cost)
            if worker is not None:
                return self.lease_worker(worker, cost)
        if len(self._queue) >= self.routing.queue_size:
            raise QueueFull(f"Router queue is full ({self.routing.queue_size} waiting)")
        waiter = _Waiter(accept, excluded, cost)
        entry = (-priority, next(self._seq), waiter)
        heapq.heappush(self._queue, entry)
        self._notify()
        try:
            with trio.move_on_after(self.routing.queue_timeout_s):
                await waiter.event.wait()
        except BaseException:
            if waiter.lease is not None:
                waiter.lease.release()
            else:
                self._leave_queue(entry)
            raise
        if waiter.lease is None:
            self._leave_queue(entry)
            raise QueueTimeout(f"No worker became free within {self.routing.queue_timeout_s:g}s")
        return waiter.lease

    def _leave_queue(self, entry: tuple[int, int, _Waiter]) -> None:
        self._queue.remove(entry)
        heapq.heapify(self._queue)

    def _candidates(
        self, accept: Callable[[Worker], bool] | None, excluded: frozenset[int], *, limit: bool
    ) -> list[Worker]:
        if limit and self._paused:
            return []
        cap = self.routing.max_inflight_per_worker if limit else 0
        workers = self.routable(accept)
        if not excluded and not cap:
            return workers
        return [w for w in workers if id(w) not in excluded and (not cap or w.in_flight < cap)]

    def _dispatch_queue(self) -> None:
        """Hand freed capacity to queued requests, in priority then arrival order.

        A request that keeps waiting for a busy worker it will go to first counts, for the
        rest of this pass, as work queued on that worker (`held`): otherwise every request
        behind it would see the same short backlog, all would wait for the one fast worker,
        and slower workers that would finish them sooner would stay idle.
        """
        if not self._queue:
            return
        served = []
        held: list[tuple[Worker, float]] = []
        try:
            for entry in heapq.nsmallest(DISPATCH_DEPTH, self._queue):
                waiter = entry[2]
                worker, wait_for = self._place(waiter.accept, waiter.exclude, waiter.cost)
                if worker is not None:
                    waiter.lease = self.lease_worker(worker, waiter.cost)
                    waiter.event.set()
                    served.append(entry)
                elif wait_for is not None:
                    wait_for.outstanding_cost += waiter.cost
                    held.append((wait_for, waiter.cost))
        finally:
            for worker, cost in held:
                worker.outstanding_cost -= cost
        if served:
            self._queue = [e for e in self._queue if e not in served]
            heapq.heapify(self._queue)

    def _place(
        self, accept: Callable[[Worker], bool] | None, excluded: frozenset[int], cost: float
    ) -> tuple[Worker | None, Worker | None]:
        """The worker a request should start on now, or (None, the busy worker it waits
        for, if it waits for a particular one): it waits in the queue.

        With a per-worker limit, a predictive policy (least-work) chooses among all suitable
        workers, busy ones included, and the request waits if the best one is full: a big job
        is better off waiting a second for a fast GPU than starting at once on one four
        times slower, and a later, smaller request may take the free worker meanwhile. Other
        policies, and pools too large to compare every worker, take the best free worker.
        """
        if self._paused:
            return None, None
        cap = self.routing.max_inflight_per_worker
        if cap and self.policy.predictive:
            candidates = self._candidates(accept, excluded, limit=False)
            if candidates and len(candidates) <= SAMPLE_ABOVE:
                best = self._choose(candidates, cost)
                return (best, None) if best.in_flight < cap else (None, best)
        free = self._candidates(accept, excluded, limit=True)
        return (self._choose(free, cost) if free else None), None

    def _choose(self, candidates: list[Worker], cost: float) -> Worker:
        if self._spu_cache is None:
            self._spu_cache = pool_median(
                [w.speed for w in self._workers.values()], self.default_spu
            )
        return self.policy.choose(candidates, cost, self._spu_cache, self.clock())

    def lease_worker(self, worker: Worker, cost: float = 0.0) -> Lease:
        """Count a request against a specific worker (sticky jobs, broadcasts)."""
        if not worker.in_flight:
            worker.work_started_at = self.clock()
        worker.in_flight += 1
        worker.requests_total += 1
        worker.outstanding_cost += cost
        lease = Lease(self, worker, cost)
        if self._half_open(worker):
            worker.trial_in_flight = True
            lease.trial = True
        return lease

    def _release(self, lease: Lease) -> None:
        worker = lease.worker
        worker.in_flight -= 1
        worker.outstanding_cost = max(0.0, worker.outstanding_cost - lease.cost)
        worker.work_started_at = self.clock()
        assert worker.in_flight >= 0, "lease released twice"
        if lease.trial:
            worker.trial_in_flight = False
        if worker.draining and worker.remove_when_idle and worker.in_flight == 0:
            self.remove(worker.url)
        self._notify()

    def observe(self, worker: Worker, cost: float, started: float, finished: float) -> None:
        """Learn a worker's speed from one completed request.

        A worker runs one generation at a time, so a request that waited behind another one
        in the worker started its real work when the previous one finished.
        """
        begin = max(started, worker.last_completion_at)
        worker.last_completion_at = finished
        worker.speed.observe(cost, finished - begin)
        self._spu_cache = None

    def record_result(self, worker: Worker, ok: bool, error: str | None = None) -> None:
        """Passive health: a request's outcome counts like a probe's (the circuit breaker).

        A worker that fails fast would otherwise attract ever more traffic under
        least-request; `failure_threshold` failures in a row open its breaker (dead), and
        after `breaker_open_s` one trial request may close it again. Requests may keep at
        most `health.max_ejection_percent` of the pool out this way: past that share, a
        failing pool is more likely failed by its clients than by its workers, and the
        probes still take out a worker that is really gone.
        """
        if ok:
            worker.consecutive_failures = 0
            if worker.health is Health.DEAD and not worker.quarantined_by_operator:
                self._set_health(worker, Health.HEALTHY)
            return
        worker.consecutive_successes = 0
        worker.consecutive_failures += 1
        worker.last_error = error
        if worker.health is Health.DEAD:
            self._open_breaker(worker)
        elif (
            worker.health is Health.HEALTHY
            and worker.consecutive_failures >= self.health_config.failure_threshold
        ):
            ejected = sum(1 for w in self._workers.values() if w.tripped_by_requests)
            allowed = len(self._workers) * self.health_config.max_ejection_percent // 100
            if ejected >= allowed:
                if worker.consecutive_failures == self.health_config.failure_threshold:
                    log.warning(
                        "worker %s failed %d requests in a row (%s) but stays in rotation: "
                        "%d of %d workers are already out by failed requests "
                        "(health.max_ejection_percent = %d)",
                        worker.display_id,
                        worker.consecutive_failures,
                        error,
                        ejected,
                        len(self._workers),
                        self.health_config.max_ejection_percent,
                    )
                return
            self._set_health(worker, Health.DEAD)
            worker.tripped_by_requests = True

    def _open_breaker(self, worker: Worker) -> None:
        worker.opened_at = self.clock()
        worker.half_open_after = worker.opened_at + self.health_config.breaker_open_s

    # ---- state changes -------------------------------------------------------------------

    def apply_probe(
        self,
        url: str,
        outcome: ProbeOutcome,
        error: str | None = None,
        latency_s: float | None = None,
    ) -> None:
        """Fold one health-probe result into the worker's state machine.

        starting --ok--> healthy --N failures--> dead --M oks--> healthy. A worker that has not
        been healthy yet and is refused or warming stays `starting`: that is model loading,
        not a fault. Dead workers keep being probed so they can recover on their own; one
        whose breaker failed requests opened comes back only through its half-open trial
        (after `breaker_open_s`), unless its probes fail too, which makes it probe-dead.
        """
        worker = self._workers.get(url)
        if worker is None:
            return
        worker.last_probe_at = time.time()
        self.probe_counts[outcome.value] += 1
        if latency_s is not None:
            worker.probe_latency_s = latency_s
        cfg = self.health_config
        if outcome is ProbeOutcome.OK:
            worker.consecutive_failures = 0
            worker.consecutive_successes += 1
            worker.last_error = None
            if worker.health is Health.STARTING or (
                worker.health is Health.DEAD
                and not worker.quarantined_by_operator
                and (
                    (
                        worker.consecutive_successes >= cfg.recovery_threshold
                        and not worker.tripped_by_requests
                    )
                    or self._half_open(worker)
                )
            ):
                self._set_health(worker, Health.HEALTHY)
            return
        worker.consecutive_successes = 0
        worker.consecutive_failures += 1
        worker.last_error = error or outcome.value
        if worker.health is Health.STARTING:
            return
        if worker.health is Health.DEAD:
            worker.tripped_by_requests = False
            self._open_breaker(worker)
        elif worker.consecutive_failures >= cfg.failure_threshold:
            self._set_health(worker, Health.DEAD)

    def set_dead(self, worker: Worker, dead: bool) -> None:
        """Operator override (`PUT /workers/{id}` with `is_dead`): sticky until undone."""
        worker.consecutive_failures = 0
        worker.consecutive_successes = 0
        worker.quarantined_by_operator = dead
        if not dead:
            worker.last_error = None
        self._set_health(worker, Health.DEAD if dead else Health.HEALTHY)

    def set_draining(self, worker: Worker, draining: bool, remove_when_idle: bool) -> None:
        """Take a worker out of rotation for maintenance; optionally forget it once idle."""
        worker.draining = draining
        worker.remove_when_idle = draining and remove_when_idle
        log.info("worker %s %s", worker.display_id, "draining" if draining else "undrained")
        if worker.remove_when_idle and worker.in_flight == 0:
            self.remove(worker.url)
        elif not draining and worker.stale:
            self.request_catch_up(worker.url)  # refits skip draining workers
        self._notify()

    def set_sleeping(self, worker: Worker, sleeping: bool) -> None:
        """Record the router's own view of sleep: workers keep `/health` at 200 while asleep."""
        if worker.sleeping == sleeping:
            return
        worker.sleeping = sleeping
        if not sleeping:
            worker.consecutive_failures = 0
            if worker.health is Health.DEAD:
                self._set_health(worker, Health.HEALTHY)
            if worker.stale:
                self.request_catch_up(worker.url)
        log.info("worker %s is %s", worker.display_id, "sleeping" if sleeping else "awake")
        self._notify()

    def set_capabilities(self, url: str, caps: Capabilities) -> None:
        worker = self._workers.get(url)
        if worker is not None:
            worker.capabilities = caps

    def _set_health(self, worker: Worker, health: Health) -> None:
        if worker.health is health:
            return
        previous, worker.health = worker.health, health
        self.transition_counts[health.value] += 1
        if health is Health.DEAD:
            self._open_breaker(worker)
        else:
            worker.half_open_after = math.inf
            worker.tripped_by_requests = False
        level = logging.WARNING if health is Health.DEAD else logging.INFO
        log.log(
            level,
            "worker %s: %s -> %s%s",
            worker.display_id,
            previous.value,
            health.value,
            f" ({worker.last_error})" if worker.last_error and health is Health.DEAD else "",
        )
        if health is Health.HEALTHY:
            self.request_capability_refresh(worker.url)
            if self.target_version is not None and previous is Health.DEAD:
                worker.weights = None
            self._update_staleness(worker)
            if worker.stale:
                self.request_catch_up(worker.url)
        self._notify()

    # ---- weights and sleep of the whole pool ---------------------------------------------

    def _update_staleness(self, worker: Worker) -> None:
        worker.stale = self.target_version is not None and worker.weights != self.target_version

    def set_target(self, version: str) -> None:
        """A refit moved the pool to `version`: every worker not confirmed on it is stale."""
        self.target_version = version
        for worker in self._workers.values():
            self._update_staleness(worker)
        self._notify()

    def confirm_weights(self, worker: Worker, version: str) -> None:
        worker.weights = version
        self._update_staleness(worker)
        self._notify()

    def mark_stale(self, worker: Worker, reason: str) -> None:
        """A refit (or its checksum check) failed on this worker: keep it out of rotation
        and have the registry task catch it up, which retries with backoff.

        The catch-up itself calls this on each failed attempt; that request is dropped
        because one catch-up per worker runs at a time (`request_catch_up`), so failures
        cannot start a second retry loop.
        """
        worker.weights = None
        worker.last_error = reason
        self._update_staleness(worker)
        if worker.stale:
            self.request_catch_up(worker.url)
        self._notify()

    def set_pool_sleeping(self, sleeping: bool) -> None:
        self.pool_sleeping = sleeping
        self._notify()

    def pause(self) -> _Pause:
        """Stop dispatching (requests wait in the queue) for the duration of a `with`."""
        return _Pause(self)

    def _notify(self) -> None:
        """Something changed that may free capacity: serve the queue, wake watchers."""
        self._dispatch_queue()
        self.changed.set()
        self.changed = trio.Event()

    # ---- capability refresh, owned by the registry task ----------------------------------

    def request_capability_refresh(self, url: str) -> trio.Event:
        """Ask the registry task to re-read a worker's capabilities; the event fires when done.

        Requests for a worker whose refresh is still pending share that refresh.
        """
        event = self._refreshes.get(url)
        if event is None:
            event = self._refreshes[url] = trio.Event()
            self._refresh_send.send_nowait(("capabilities", url))
        return event

    def request_catch_up(self, url: str) -> None:
        """Ask the registry task to bring a stale worker to the pool's weights (and sleep).

        A no-op while that worker's catch-up runs: the running one retries until done.
        """
        if url not in self._catching_up:
            self._catching_up.add(url)
            self._refresh_send.send_nowait(("catch-up", url))

    async def run(
        self,
        prober: CapabilityProber,
        catch_up: CatchUp,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The registry task: runs the capability probes and catch-ups state changes ask for."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._recheck_queue)
            task_status.started()
            async for kind, url in self._refresh_receive:
                if kind == "capabilities":
                    nursery.start_soon(self._refresh, prober, url)
                else:
                    nursery.start_soon(self._catch_up, catch_up, url)

    async def _recheck_queue(self) -> None:
        """Dispatch again now and then although nothing happened.

        A request held back for a busy worker that predicted to finish it first must not
        wait on that worker forever: as the worker overruns its prediction, another one
        becomes the better choice, and only the passing of time says so.
        """
        while True:
            await trio.sleep(QUEUE_RECHECK_S)
            if self._queue:
                self._dispatch_queue()

    async def _catch_up(self, catch_up: CatchUp, url: str) -> None:
        try:
            await catch_up(url)
        except Exception:
            _log_task_failure("weight catch-up", url)
        finally:
            self._catching_up.discard(url)

    async def _refresh(self, prober: CapabilityProber, url: str) -> None:
        try:
            caps = await prober(url)
            if caps is not None:
                self.set_capabilities(url, caps)
        except Exception:
            _log_task_failure("capability probe", url)
        finally:
            self._refreshes.pop(url).set()


def _log_task_failure(task: str, url: str) -> None:
    """Contain a failure of one worker's background task: log it, keep the registry task.

    These tasks run in the registry task's nursery, under the root nursery: an exception
    escaping one worker's catch-up or capability probe would stop the router for every
    worker. The expected failures (a worker that does not answer, answers garbage) are
    handled where they happen; what arrives here is a bug, so it is logged at ERROR with
    its traceback and the worker, and only that task ends. A later state change asks for
    the task again.
    """
    log.exception("%s of worker %s failed; the router goes on without it", task, url)


def video_support_from(task_types: Sequence[str], output_types: Sequence[str]) -> bool | None:
    """Video-capable per SEEDS.md: any VIDEO output, else a first task outside the image set."""
    if output_types:
        return "VIDEO" in output_types
    if task_types:
        return any(t in VIDEO_TASKS for t in task_types) or task_types[0] not in IMAGE_ONLY_TASKS
    return None
