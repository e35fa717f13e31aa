"""Each worker's health: the probe state machine (active) and the circuit breaker (passive).

starting --ok--> healthy --N failures--> dead --M oks--> healthy, where failures are probe
results (`apply_probe`) or request outcomes (`record_result`). A worker the breaker took out
gets one trial request (half-open) `breaker_open_s` later; the operator's quarantine
(`set_dead`) never half-opens. Every change of `Worker.health` goes through
`Breaker._set_health`, which tells the registry (`on_transition`) so it can refresh
capabilities, catch weights up and serve the queue.
"""

from __future__ import annotations

import collections
import logging
import math
import time
from collections.abc import Callable, Mapping

from dsrouter.config import HealthConfig
from dsrouter.registry.worker import Health, Worker
from dsrouter.workers_http.readiness import ProbeOutcome

log = logging.getLogger("dsrouter.registry")


class Breaker:
    """Owns `Worker.health` and the fields that decide it (see the package docstring)."""

    def __init__(
        self,
        config: HealthConfig,
        workers: Mapping[str, Worker],
        clock: Callable[[], float],
        on_transition: Callable[[Worker, Health], None],
    ) -> None:
        self.config = config
        self._workers = workers
        self._clock = clock
        self._on_transition = on_transition
        """Called with the worker and its previous health after every transition."""
        self.probe_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        """(worker, outcome) -> probes; read by the metrics collector."""
        self.failure_counts: collections.Counter[tuple[str, str]] = collections.Counter()
        """(worker, "probe" | "request") -> failures counted against the worker."""
        self.transition_counts: collections.Counter[str] = collections.Counter()

    def half_open(self, worker: Worker) -> bool:
        """Dead by faults (not by an operator) long enough to deserve one trial request."""
        return (
            worker.health is Health.DEAD
            and not worker.quarantined_by_operator
            and self._clock() >= worker.half_open_after
        )

    def begin_trial(self, worker: Worker) -> bool:
        """A request is leased to `worker`: if it is half-open, that request is its trial."""
        if not self.half_open(worker):
            return False
        worker.trial_in_flight = True
        return True

    def end_trial(self, worker: Worker) -> None:
        worker.trial_in_flight = False

    def apply_probe(
        self,
        worker: Worker,
        outcome: ProbeOutcome,
        error: str | None = None,
        latency_s: float | None = None,
    ) -> None:
        """Fold one health-probe result into the worker's state machine.

        A worker that has not been healthy yet and is refused or warming stays `starting`:
        that is model loading, not a fault. Dead workers keep being probed so they can
        recover on their own; one whose breaker failed requests opened comes back only
        through its half-open trial (after `breaker_open_s`), unless its probes fail too,
        which makes it probe-dead.
        """
        worker.last_probe_at = time.time()
        self.probe_counts[worker.display_id, outcome.value] += 1
        if latency_s is not None:
            worker.probe_latency_s = latency_s
        cfg = self.config
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
                    or self.half_open(worker)
                )
            ):
                self._set_health(worker, Health.HEALTHY)
            return
        worker.consecutive_successes = 0
        worker.consecutive_failures += 1
        worker.last_error = error or outcome.value
        self.failure_counts[worker.display_id, "probe"] += 1
        if worker.health is Health.STARTING:
            return
        if worker.health is Health.DEAD:
            worker.tripped_by_requests = False
            self._open(worker)
        elif worker.consecutive_failures >= cfg.failure_threshold:
            self._set_health(worker, Health.DEAD)

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
        self.failure_counts[worker.display_id, "request"] += 1
        if worker.health is Health.DEAD:
            self._open(worker)
        elif (
            worker.health is Health.HEALTHY
            and worker.consecutive_failures >= self.config.failure_threshold
        ):
            ejected = sum(1 for w in self._workers.values() if w.tripped_by_requests)
            allowed = len(self._workers) * self.config.max_ejection_percent // 100
            if ejected >= allowed:
                if worker.consecutive_failures == self.config.failure_threshold:
                    log.warning(
                        "worker %s failed %d requests in a row (%s) but stays in rotation: "
                        "%d of %d workers are already out by failed requests "
                        "(health.max_ejection_percent = %d)",
                        worker.display_id,
                        worker.consecutive_failures,
                        error,
                        ejected,
                        len(self._workers),
                        self.config.max_ejection_percent,
                    )
                return
            self._set_health(worker, Health.DEAD)
            worker.tripped_by_requests = True

    def set_dead(self, worker: Worker, dead: bool) -> None:
        """Operator override (`PUT /workers/{id}` with `is_dead`): sticky until undone."""
        worker.consecutive_failures = 0
        worker.consecutive_successes = 0
        worker.quarantined_by_operator = dead
        if not dead:
            worker.last_error = None
        self._set_health(worker, Health.DEAD if dead else Health.HEALTHY)

    def woke(self, worker: Worker) -> None:
        """A sleeping worker woke up: failures seen while it slept do not count."""
        worker.consecutive_failures = 0
        if worker.health is Health.DEAD:
            self._set_health(worker, Health.HEALTHY)

    def _open(self, worker: Worker) -> None:
        worker.opened_at = self._clock()
        worker.half_open_after = worker.opened_at + self.config.breaker_open_s

    def _set_health(self, worker: Worker, health: Health) -> None:
        if worker.health is health:
            return
        previous, worker.health = worker.health, health
        self.transition_counts[health.value] += 1
        if health is Health.DEAD:
            self._open(worker)
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
        self._on_transition(worker, previous)
