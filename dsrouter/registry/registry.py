"""The registry: the one owner of the pool's workers and of the parts that keep their state.

It holds membership (add, remove, drain), the cache of routable workers, the breaker, the
dispatch queue and the pool's weights, wires them to each other, and runs the registry task
(`Registry.run`): capability probes after a worker registers, becomes healthy or recovers,
and weight catch-up of workers that are stale (they missed a refit, or recovered and may
have restarted). The rest of the router talks to this class only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

import trio

from dsrouter.config import HealthConfig, RoutingConfig
from dsrouter.jobs import JobMap
from dsrouter.policies import Policy
from dsrouter.registry.breaker import Breaker
from dsrouter.registry.dispatch import FIRST_COME, Dispatcher, Lease, PoolAsleep, QueuePlace
from dsrouter.registry.weights import PoolWeights
from dsrouter.registry.worker import Capabilities, Health, RoutingEpoch, Worker
from dsrouter.urls import display_id_for, normalize_worker_url, worker_id_for
from dsrouter.workers_http.readiness import ProbeOutcome

log = logging.getLogger("dsrouter.registry")

CapabilityProber = Callable[[str], Awaitable[Capabilities | None]]
CatchUp = Callable[[str], Awaitable[None]]


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
        self.clock = clock
        self.jobs = JobMap(max_jobs)
        self._workers: dict[str, Worker] = {}
        self._epoch = RoutingEpoch()
        self._breaker = Breaker(health, self._workers, clock, self._health_changed)
        self._weights = PoolWeights(
            self._workers, self._breaker, self.request_catch_up, self._notify
        )
        self._dispatch = Dispatcher(
            routing or RoutingConfig(),
            policy,
            default_spu,
            workers=self._workers,
            routable=self.routable,
            breaker=self._breaker,
            weights=self._weights,
            clock=clock,
            notify=self._notify,
            released=self._lease_ended,
        )
        self.probe_counts = self._breaker.probe_counts
        self.failure_counts = self._breaker.failure_counts
        self.transition_counts = self._breaker.transition_counts
        self._refresh_send, self._refresh_receive = trio.open_memory_channel[tuple[str, str]](
            math.inf
        )
        self._refreshes: dict[str, trio.Event] = {}
        self._catching_up: set[str] = set()
        self.changed = trio.Event()
        self.control_lock = trio.Lock()
        """Held by every control broadcast and catch-up, so they never interleave."""
        self._routable: dict[Callable[[Worker], bool] | None, list[Worker]] = {}
        self._routable_epoch = -1
        self._routable_until = math.inf

    def reconfigure(
        self,
        health: HealthConfig,
        routing: RoutingConfig,
        default_spu: float,
        policy: Policy | None = None,
    ) -> None:
        """Apply a reloaded configuration; `policy` None keeps the current one (and its
        state, such as a round-robin position)."""
        self._breaker.config = health
        self.jobs.capacity = routing.max_jobs
        if policy is None:
            policy = self._dispatch.policy
        self._dispatch.reconfigure(routing, default_spu, policy)

    # ---- reading -------------------------------------------------------------------------

    @property
    def routing(self) -> RoutingConfig:
        return self._dispatch.routing

    @property
    def target_version(self) -> str | None:
        return self._weights.target_version

    @property
    def pool_sleeping(self) -> bool:
        return self._weights.pool_sleeping

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
        """Workers a request may go to: healthy ones, plus half-open ones awaiting a trial
        (never one whose weights are unconfirmed); none while the pool sleeps.

        Cached: with a thousand workers a scan per request was the main routing cost. The
        cache is rebuilt when a routing-relevant field changes (the registry's
        `RoutingEpoch`), when membership changes, or when a breaker's half-open time comes.
        The list is shared: callers must not mutate it. `accept` should be a long-lived
        function (see `proxy.accept_for`); a few distinct ones are cached per rebuild.
        """
        if self._routable_epoch != self._epoch.value or (
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
        for w in () if self.pool_sleeping else self._workers.values():
            if w.routable:
                base.append(w)
            elif (
                w.health is Health.DEAD
                and not w.quarantined_by_operator
                and not w.trial_in_flight
                and not w.sleeping
                and not w.draining
                and not w.stale
                and w.half_open_after != math.inf
            ):
                now = self.clock() if now is None else now
                if now >= w.half_open_after:
                    base.append(w)
                else:
                    until = min(until, w.half_open_after)
        self._routable = {None: base}
        self._routable_epoch = self._epoch.value
        self._routable_until = until

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
            "queued": self._dispatch.queued,
            "stale_workers": sum(1 for w in workers if w.stale),
        }

    def queued_by_tenant(self) -> dict[str, int]:
        """Requests waiting in the router queue, per tenant (not in `summary`: the public
        `/health` shows that, and tenant names are for operators)."""
        return self._dispatch.queued_by_tenant()

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
            routing_epoch=self._epoch,
            managed=managed,
            api_key=api_key,
            source="launcher" if managed is not None else source,
        )
        self._workers[url] = worker
        self._epoch.bump()
        log.info("worker %s registered", worker.display_id)
        self._notify()
        return worker, True

    def remove(self, url: str) -> Worker | None:
        worker = self._workers.pop(url, None)
        self._epoch.bump()
        if worker is not None:
            forgotten = self.jobs.forget_worker(url)
            log.info("worker %s removed (%d job ids forgotten)", worker.display_id, forgotten)
            self._notify()
        return worker

    def update_managed(self, url: str, info: dict[str, Any]) -> None:
        worker = self._workers.get(url)
        if worker is not None:
            worker.managed = info

    def set_capabilities(self, url: str, caps: Capabilities) -> None:
        worker = self._workers.get(url)
        if worker is not None:
            worker.capabilities = caps

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

    def _lease_ended(self, worker: Worker) -> None:
        if worker.draining and worker.remove_when_idle and worker.in_flight == 0:
            self.remove(worker.url)

    # ---- requests (dispatch.py) ----------------------------------------------------------

    async def acquire(
        self,
        accept: Callable[[Worker], bool] | None = None,
        exclude: Iterable[Worker] = (),
        cost: float = 1.0,
        place: QueuePlace = FIRST_COME,
    ) -> Lease:
        """A lease on the best worker with room, waiting in the router queue if none has."""
        return await self._dispatch.acquire(accept, exclude, cost, place)

    def lease_worker(self, worker: Worker, cost: float = 0.0) -> Lease:
        """Count a request against a specific worker (sticky jobs, broadcasts)."""
        return self._dispatch.lease_worker(worker, cost)

    async def lease_session(
        self, accept: Callable[[Worker], bool] | None, wait_s: float
    ) -> Lease | None:
        """A lease holding a free worker's realtime slot, waiting up to `wait_s` for one to
        free up (a session ends, a worker joins or recovers); None if none did.

        Not the router queue: a session holds its worker for minutes, so waiting behind
        generations for "room" would mean nothing; only a free slot will do.
        """
        with trio.move_on_after(wait_s):
            while (lease := self._dispatch.lease_session(accept)) is None:
                await self.changed.wait()
            return lease
        return None

    def observe(self, worker: Worker, cost: float, started: float, finished: float) -> None:
        """Learn a worker's speed from one completed request."""
        self._dispatch.observe(worker, cost, started, finished)

    def pause(self) -> AbstractContextManager[None]:
        """Stop dispatching (requests wait in the queue) for the duration of a `with`."""
        return self._dispatch.pause()

    # ---- health (breaker.py) -------------------------------------------------------------

    def apply_probe(
        self,
        url: str,
        outcome: ProbeOutcome,
        error: str | None = None,
        latency_s: float | None = None,
    ) -> None:
        """Fold one health-probe result into the worker's state machine (if still here)."""
        worker = self._workers.get(url)
        if worker is not None:
            self._breaker.apply_probe(worker, outcome, error, latency_s)

    def record_result(self, worker: Worker, ok: bool, error: str | None = None) -> None:
        """Passive health: a request's outcome counts like a probe's (the circuit breaker)."""
        self._breaker.record_result(worker, ok, error)

    def set_dead(self, worker: Worker, dead: bool) -> None:
        """Operator override (`PUT /workers/{id}` with `is_dead`): sticky until undone."""
        self._breaker.set_dead(worker, dead)

    def _health_changed(self, worker: Worker, previous: Health) -> None:
        if worker.health is Health.HEALTHY:
            self.request_capability_refresh(worker.url)
            self._weights.became_healthy(worker, was_dead=previous is Health.DEAD)
        elif worker.health is Health.DEAD:
            self._weights.went_dead(worker)
        self._notify()

    # ---- weights and sleep (weights.py) --------------------------------------------------

    def set_target(self, version: str) -> None:
        """A refit moved the pool to `version`: every worker not confirmed on it is stale."""
        self._weights.set_target(version)

    def clear_target(self) -> None:
        """The pool starts a new weight lineage (a new model): no worker is stale."""
        self._weights.clear_target()

    def confirm_weights(self, worker: Worker, version: str) -> None:
        self._weights.confirm_weights(worker, version)

    def mark_stale(self, worker: Worker, reason: str) -> None:
        """A refit failed on this worker: out of rotation until the registry task catches
        it up."""
        self._weights.mark_stale(worker, reason)

    def set_sleeping(self, worker: Worker, sleeping: bool) -> None:
        """Record the router's own view of sleep: workers keep `/health` at 200 while asleep."""
        self._weights.set_sleeping(worker, sleeping)

    def set_pool_sleeping(self, sleeping: bool) -> None:
        """While the pool sleeps no worker is routable, whatever its own state (one that
        recovers meanwhile is put to sleep by its catch-up), and requests waiting in the
        queue get "pool is asleep" unless `routing.queue_while_asleep` keeps them."""
        self._epoch.bump()
        if sleeping and not self.routing.queue_while_asleep:
            self._dispatch.refuse_all(PoolAsleep("pool is asleep"))
        self._weights.set_pool_sleeping(sleeping)

    def _notify(self) -> None:
        """Something changed that may free capacity: serve the queue, wake watchers."""
        self._dispatch.dispatch_queue()
        self.changed.set()
        self.changed = trio.Event()

    # ---- capability refresh and catch-up, owned by the registry task ---------------------

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
        """The registry task: runs the capability probes and catch-ups state changes ask for,
        and re-serves the queue now and then (`Dispatcher.recheck`)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dispatch.recheck)
            task_status.started()
            async for kind, url in self._refresh_receive:
                if kind == "capabilities":
                    nursery.start_soon(self._refresh, prober, url)
                else:
                    nursery.start_soon(self._catch_up, catch_up, url)

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
