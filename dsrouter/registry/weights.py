"""The pool's weights and sleep: which version every worker should serve, who is behind.

Once a refit has set the pool's target version, a worker whose confirmed version differs is
`stale` and not routable, so no request is ever served by weights the trainer has moved
past. A stale worker is caught up by the registry task (`request_catch_up`), which retries
until it succeeds. Sleep is recorded here too: workers keep `/health` at 200 while asleep,
so only the router's own view says a worker (or the whole pool) has released its GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from dsrouter.registry.breaker import Breaker
from dsrouter.registry.worker import Worker

log = logging.getLogger("dsrouter.registry")


class PoolWeights:
    """Owns `Worker.weights`, `stale` and `sleeping`, and the pool's target and sleep."""

    def __init__(
        self,
        workers: Mapping[str, Worker],
        breaker: Breaker,
        request_catch_up: Callable[[str], None],
        notify: Callable[[], None],
    ) -> None:
        self._workers = workers
        self._breaker = breaker
        self._request_catch_up = request_catch_up
        self._notify = notify
        self.target_version: str | None = None
        self.pool_sleeping = False

    def set_target(self, version: str) -> None:
        """A refit moved the pool to `version`: every worker not confirmed on it is stale."""
        self.target_version = version
        for worker in self._workers.values():
            self._update_staleness(worker)
        self._notify()

    def clear_target(self) -> None:
        """A new lineage (another model): every worker's launch weights are right again."""
        self.target_version = None
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
        because one catch-up per worker runs at a time (`Registry.request_catch_up`), so
        failures cannot start a second retry loop.
        """
        worker.weights = None
        worker.last_error = reason
        self._update_staleness(worker)
        if worker.stale:
            self._request_catch_up(worker.url)
        self._notify()

    def became_healthy(self, worker: Worker, was_dead: bool) -> None:
        """A worker (re)joined the healthy pool: a dead one may have restarted on its launch
        weights, so once the pool has a target it counts as unconfirmed until caught up; one
        that comes while the pool sleeps is put to sleep first (the catch-up does both).

        A dead one that the router had put to sleep may have restarted awake, or missed the
        wake: the catch-up releases it again while the pool sleeps, else resumes it."""
        if self.target_version is not None and was_dead:
            worker.weights = None
        self._update_staleness(worker)
        if (
            worker.stale
            or (self.pool_sleeping and not worker.sleeping)
            or (was_dead and worker.sleeping)
        ):
            self._request_catch_up(worker.url)

    def went_dead(self, worker: Worker) -> None:
        """A dead worker may come back as a new process on its launch weights: once the pool
        has a target, it is unconfirmed from now on, so not even the breaker's trial request
        reaches it before a catch-up has confirmed its weights."""
        if self.target_version is not None:
            worker.weights = None
            self._update_staleness(worker)

    def set_sleeping(self, worker: Worker, sleeping: bool) -> None:
        """Record the router's own view of sleep: workers keep `/health` at 200 while asleep."""
        if worker.sleeping == sleeping:
            return
        worker.sleeping = sleeping
        if not sleeping:
            self._breaker.woke(worker)
            if worker.stale:
                self._request_catch_up(worker.url)
        log.info("worker %s is %s", worker.display_id, "sleeping" if sleeping else "awake")
        self._notify()

    def set_pool_sleeping(self, sleeping: bool) -> None:
        self.pool_sleeping = sleeping
        if not sleeping:  # a worker that stayed awake through the sleep may be behind
            for worker in self._workers.values():
                if worker.stale and not worker.sleeping:
                    self._request_catch_up(worker.url)
        self._notify()

    def _update_staleness(self, worker: Worker) -> None:
        worker.stale = self.target_version is not None and worker.weights != self.target_version
