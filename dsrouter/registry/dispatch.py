"""The dispatch queue: which worker a request goes to, and when.

A request gets a `Lease` on the best worker with room (`acquire`), or waits in the router
queue until capacity frees up (late binding). Each lease
counts against its worker until it is released, exactly once, however the request ends;
releases and every other change that may free capacity (`Registry._notify`) serve the queue.

Queue order (`QueuePlace`, `_order`): the priority class first (a request's class rises one
step per `aging_s` waited, so bulk work is never starved), then the integer priority, then
start-time fair queuing between tenants: each request is tagged on arrival with a start
time in GPU work (`max(virtual time, its tenant's previous finish)`; finish = start +
cost / weight) and the smallest start goes first, so backlogged tenants get equal shares of
cost units however they size their jobs.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

import attrs
import trio

from dsrouter.config import RoutingConfig
from dsrouter.policies import SAMPLE_ABOVE, Policy
from dsrouter.registry.breaker import Breaker
from dsrouter.registry.weights import PoolWeights
from dsrouter.registry.worker import Worker
from dsrouter.speed import Prior, pool_prior

DISPATCH_DEPTH = 64
"""How far into the router queue one dispatch looks for a request the freed worker suits:
bounded so that a release costs the same with ten thousand requests queued."""
QUEUE_RECHECK_S = 0.25

ASLEEP_RETRY_AFTER_S = 10
"""The Retry-After of every "pool is asleep" answer (inference and discovery alike)."""


class NoWorkerAvailable(Exception):
    """No worker satisfies the request right now; the message is safe to show to a client."""


class QueueFull(Exception):
    """The router queue is at `routing.queue_size`: the client should retry later (429)."""


class QueueTimeout(Exception):
    """A request waited `routing.queue_timeout_s` without a worker freeing up (503)."""


class PoolAsleep(Exception):
    """Every worker sleeps (released its GPU memory); the client should come back (503)."""


class Lease:
    """One request's claim on a worker. Released exactly once, however the request ends."""

    __slots__ = ("_dispatcher", "cost", "queued", "released", "session", "trial", "worker")

    def __init__(self, dispatcher: Dispatcher, worker: Worker, cost: float) -> None:
        self._dispatcher = dispatcher
        self.worker = worker
        self.cost = cost
        self.released = False
        self.trial = False
        """True when this request is the half-open breaker's one trial."""
        self.session = False
        """True when this lease holds the worker's realtime slot (`lease_session`)."""
        self.queued = False
        """True when the request waited in the router queue for it (a trace's queue span)."""

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._dispatcher._release(self)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@attrs.frozen
class QueuePlace:
    """Where a request stands in the router queue (see the module docstring)."""

    rank: int = 0
    """Its priority class, as an index: 0 is served first."""
    priority: int = 0
    """Within a class, higher first (before fair share)."""
    tenant: str = ""
    weight: float = 1.0
    """The tenant's share of GPU work relative to the others in its class."""
    aging_s: float = 0.0
    """Each this many seconds waited raise the request one class (0: never)."""


FIRST_COME = QueuePlace()
"""The place of a request that names none: the first class, one anonymous tenant."""


class _Pause:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher

    def __enter__(self) -> None:
        self.dispatcher._paused += 1

    def __exit__(self, *exc_info: object) -> None:
        self.dispatcher._paused -= 1
        self.dispatcher._notify()


@attrs.define(eq=False)
class _Waiter:
    """A request queued in the router until a worker has room (late binding)."""

    accept: Callable[[Worker], bool] | None
    exclude: frozenset[int]
    cost: float
    place: QueuePlace
    since: float
    start: float
    """Its start tag in virtual GPU work (fair queuing)."""
    seq: int
    event: trio.Event = attrs.Factory(trio.Event)
    lease: Lease | None = None
    refusal: Exception | None = None
    """Set instead of a lease when the queue is emptied (`refuse_all`)."""


class Dispatcher:
    """Owns the router queue and each worker's load: `in_flight`, `requests_total`,
    `outstanding_cost`, `lease_costs`, `work_started_at`, and the speed learnt from
    completed requests."""

    def __init__(
        self,
        routing: RoutingConfig,
        policy: Policy,
        default_spu: float,
        *,
        workers: Mapping[str, Worker],
        routable: Callable[[Callable[[Worker], bool] | None], list[Worker]],
        breaker: Breaker,
        weights: PoolWeights,
        clock: Callable[[], float],
        notify: Callable[[], None],
        released: Callable[[Worker], None],
    ) -> None:
        self.routing = routing
        self.policy = policy
        self.default_spu = default_spu
        self._workers = workers
        self._routable = routable
        self._breaker = breaker
        self._weights = weights
        self._clock = clock
        self._notify = notify
        self._released = released
        """Called after a lease on the worker ended (and before the queue is served)."""
        self._prior: Prior | None = None
        """The pool's service-time figures, recomputed after a speed changes."""
        self._queue: list[_Waiter] = []
        self._seq = itertools.count()
        self._vtime = 0.0
        """Fair queuing's virtual time: the largest start tag served so far."""
        self._finish: dict[str, float] = {}
        """Each queued tenant's last finish tag; forgotten when the queue empties."""
        self._paused = 0

    def reconfigure(self, routing: RoutingConfig, default_spu: float, policy: Policy) -> None:
        self.routing = routing
        self.policy = policy
        self.default_spu = default_spu
        self._prior = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def queued_by_tenant(self) -> dict[str, int]:
        """Requests waiting, per tenant (`dsrouter status`, `/workers`)."""
        return dict(Counter(waiter.place.tenant for waiter in self._queue))

    async def acquire(
        self,
        accept: Callable[[Worker], bool] | None = None,
        exclude: Iterable[Worker] = (),
        cost: float = 1.0,
        place: QueuePlace = FIRST_COME,
    ) -> Lease:
        """A lease on the best worker with room, waiting in the router queue if none has.

        Queued in the order of `place` (see the module docstring). A waiter that is
        cancelled (client gone, queue timeout) leaves the queue at once, and a lease handed
        to it in the meantime is released, so no slot is lost.
        """
        excluded = frozenset(map(id, exclude))
        pool_sleeping = self._weights.pool_sleeping
        if not self._candidates(accept, excluded, limit=False) and not self._paused:
            if pool_sleeping and not self.routing.queue_while_asleep:
                raise PoolAsleep("pool is asleep")
            if not pool_sleeping:
                raise NoWorkerAvailable("No healthy workers available in the pool")
        if not self._queue:
            worker, _ = self._place(accept, excluded, cost)
            if worker is not None:
                return self.lease_worker(worker, cost)
        if len(self._queue) >= self.routing.queue_size:
            raise QueueFull(f"Router queue is full ({self.routing.queue_size} waiting)")
        start = max(self._vtime, self._finish.get(place.tenant, 0.0))
        self._finish[place.tenant] = start + cost / place.weight
        waiter = _Waiter(accept, excluded, cost, place, self._clock(), start, next(self._seq))
        self._queue.append(waiter)
        self._notify()
        try:
            with trio.move_on_after(self.routing.queue_timeout_s):
                await waiter.event.wait()
        except BaseException:
            if waiter.lease is not None:
                waiter.lease.release()
            else:
                self._leave_queue(waiter)
            raise
        if waiter.refusal is not None:
            raise waiter.refusal
        if waiter.lease is None:
            self._leave_queue(waiter)
            raise QueueTimeout(f"No worker became free within {self.routing.queue_timeout_s:g}s")
        waiter.lease.queued = True
        return waiter.lease

    def lease_worker(self, worker: Worker, cost: float = 0.0) -> Lease:
        """Count a request against a specific worker (sticky jobs, broadcasts)."""
        if not worker.in_flight:
            worker.work_started_at = self._clock()
        worker.in_flight += 1
        worker.requests_total += 1
        worker.outstanding_cost += cost
        lease = Lease(self, worker, cost)
        worker.lease_costs[id(lease)] = cost
        lease.trial = self._breaker.begin_trial(worker)
        return lease

    def lease_session(self, accept: Callable[[Worker], bool] | None) -> Lease | None:
        """A lease on the best routable worker without a realtime session, or None.

        A worker serves one realtime session at a time (a second is refused with 1008), so
        the slot is taken here, with the load, in one synchronous step: two upgrades
        arriving together cannot pick the same worker.
        """
        if self._paused:
            return None
        free = [w for w in self._routable(accept) if not w.realtime_sessions]
        if not free:
            return None
        worker = self._choose(free, 1.0)
        worker.realtime_sessions += 1
        lease = self.lease_worker(worker, 1.0)
        lease.session = True
        return lease

    def observe(self, worker: Worker, cost: float, started: float, finished: float) -> None:
        """Learn a worker's speed from one completed request.

        A worker runs one generation at a time, so a request that waited behind another one
        in the worker started its real work when the previous one finished.
        """
        begin = max(started, worker.last_completion_at)
        worker.last_completion_at = finished
        worker.speed.observe(cost, finished - begin, self.prior(), finished)
        self._prior = None

    def pause(self) -> _Pause:
        """Stop dispatching (requests wait in the queue) for the duration of a `with`."""
        return _Pause(self)

    def dispatch_queue(self) -> None:
        """Hand freed capacity to queued requests, in queue order (`_order`).

        A request that keeps waiting for a busy worker it will go to first counts, for the
        rest of this pass, as work queued on that worker (`held`): otherwise every request
        behind it would see the same short backlog, all would wait for the one fast worker,
        and slower workers that would finish them sooner would stay idle.
        """
        if not self._queue:
            return
        served = False
        held: list[tuple[Worker, float]] = []
        now = self._clock()
        try:
            for waiter in heapq.nsmallest(
                DISPATCH_DEPTH, self._queue, key=lambda w: self._order(w, now)
            ):
                worker, wait_for = self._place(waiter.accept, waiter.exclude, waiter.cost)
                if worker is not None:
                    waiter.lease = self.lease_worker(worker, waiter.cost)
                    waiter.event.set()
                    self._vtime = max(self._vtime, waiter.start)
                    served = True
                elif wait_for is not None:
                    wait_for.outstanding_cost += waiter.cost
                    held.append((wait_for, waiter.cost))
        finally:
            for worker, cost in held:
                worker.outstanding_cost -= cost
        if served:
            self._queue = [w for w in self._queue if w.lease is None]
            self._forget_if_empty()

    @staticmethod
    def _order(waiter: _Waiter, now: float) -> tuple[int, int, float, int]:
        """The sort key of a queued request now: (class after aging, -priority, start tag,
        arrival). Computed at each dispatch since aging moves it; `nsmallest` over the
        queue costs O(n log DISPATCH_DEPTH) either way."""
        place = waiter.place
        rank = place.rank
        if place.aging_s:
            rank = max(0, rank - int((now - waiter.since) // place.aging_s))
        return rank, -place.priority, waiter.start, waiter.seq

    def _forget_if_empty(self) -> None:
        """With nobody waiting no tenant is behind: finish tags restart at virtual time,
        and the map holds only tenants with requests queued."""
        if not self._queue:
            self._finish.clear()

    async def recheck(self) -> None:
        """Dispatch again now and then although nothing happened.

        A request held back for a busy worker that predicted to finish it first must not
        wait on that worker forever: as the worker overruns its prediction, another one
        becomes the better choice, and only the passing of time says so.
        """
        while True:
            await trio.sleep(QUEUE_RECHECK_S)
            if self._queue:
                self.dispatch_queue()

    def _release(self, lease: Lease) -> None:
        worker = lease.worker
        worker.in_flight -= 1
        if lease.session:
            worker.realtime_sessions -= 1
        worker.outstanding_cost = max(0.0, worker.outstanding_cost - lease.cost)
        del worker.lease_costs[id(lease)]
        worker.work_started_at = self._clock()
        assert worker.in_flight >= 0, "lease released twice"
        if lease.trial:
            self._breaker.end_trial(worker)
        self._released(worker)
        self._notify()

    def refuse_all(self, refusal: Exception) -> None:
        """Empty the queue: every waiting request gets `refusal` raised now (the pool fell
        asleep: waiting for the wake could take as long as a training step)."""
        for waiter in self._queue:
            waiter.refusal = refusal
            waiter.event.set()
        self._queue.clear()
        self._forget_if_empty()

    def _leave_queue(self, waiter: _Waiter) -> None:
        self._queue.remove(waiter)
        self._forget_if_empty()

    def _candidates(
        self, accept: Callable[[Worker], bool] | None, excluded: frozenset[int], *, limit: bool
    ) -> list[Worker]:
        if limit and self._paused:
            return []
        cap = self.routing.max_inflight_per_worker if limit else 0
        workers = self._routable(accept)
        if not excluded and not cap:
            return workers
        return [w for w in workers if id(w) not in excluded and (not cap or w.in_flight < cap)]

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

    def prior(self) -> Prior:
        """The pool's figures (medians of the learnt ones): the starting point of a worker
        with no samples and the centre its estimate is bounded around (see `speed.py`)."""
        if self._prior is None:
            self._prior = pool_prior([w.speed for w in self._workers.values()], self.default_spu)
        return self._prior

    def _choose(self, candidates: list[Worker], cost: float) -> Worker:
        return self.policy.choose(candidates, cost, self.prior(), self._clock())
