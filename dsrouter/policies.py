"""Routing policies: pick one worker from the routable candidates.

A policy sees only the candidates the registry hands it (already filtered for routability,
capability and per-worker limits), their load, and the request's estimated cost; adding a
policy means one class here and one line in `POLICIES`. Policies are called synchronously
from the registry, so their own state cannot race.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dsrouter.registry import Worker
    from dsrouter.speed import Prior


SAMPLE_ABOVE = 64
SAMPLE_SIZE = 32


def _sample(candidates: Sequence[Worker], rng: random.Random) -> Sequence[Worker]:
    """Large pools: compare a random sample instead of every worker ("power of d choices").

    Scanning a thousand workers per request cost about a millisecond; comparing 32 random
    ones keeps the choice O(1) and, with load spread by the policy itself, picks a worker
    within a small margin of the best (Mitzenmacher's power of d choices).
    """
    if len(candidates) <= SAMPLE_ABOVE:
        return candidates
    return rng.sample(candidates, SAMPLE_SIZE)


class Policy(Protocol):
    name: str
    predictive: bool
    """Predicts finish times, so a queued request may wait for a busy worker that would
    still finish it first (see `registry.dispatch.Dispatcher._place`)."""

    def choose(self, candidates: Sequence[Worker], cost: float, prior: Prior, now: float) -> Worker:
        """Return one of `candidates` (never empty).

        `cost` is the request's estimated work; `prior` the pool's service-time figures
        (what a worker that has not been measured yet is assumed to do, see `speed.py`);
        `now` the registry's clock.
        """
        ...


EXPLORE_IDLE_S = 2.0
"""An idle worker gets a request that would otherwise wait elsewhere once it has been idle
this long (or while its estimate is unsure), if it would finish it within `EXPLORE_SLACK` x
the best prediction."""
EXPLORE_SLACK = 2.0


OVERRUN_FLOOR = 0.25
"""A running request past its prediction counts as at least this share of it still to go:
the worker has not finished, and may be slower than believed."""


def predicted_finish(worker: Worker, cost: float, prior: Prior, now: float) -> float:
    """Seconds until `worker` would finish a request of `cost` taken now: its remaining
    backlog plus this request's time (what least-work ranks by; see `LeastWork`)."""
    spu, overhead = worker.speed.effective(prior, now)
    finish = overhead + cost * spu
    if worker.in_flight:
        finish += remaining_work(worker, spu, overhead, now)
    return finish


def remaining_work(worker: Worker, spu: float, overhead: float, now: float) -> float:
    """Seconds of work `worker` has left, predicted with `spu` and `overhead`.

    Only the running request (the oldest, `Worker.running_cost`) has made progress: the
    time since it began comes off its own prediction, never off the requests behind it.
    Until that prediction is reached it is trusted as it is. Past it, the running request
    still has `OVERRUN_FLOOR` of it to go, or as long again as it has overrun; and the
    overrun is evidence that the worker is slower than its estimate (which learns only
    when a request completes), so the requests behind it are scaled by the same ratio.
    Otherwise a worker whose first request at a new, slower speed overran would look
    nearly free and keep receiving requests.
    """
    running = overhead + worker.running_cost * spu
    queued = (worker.in_flight - 1) * overhead
    queued += max(0.0, worker.outstanding_cost - worker.running_cost) * spu
    elapsed = now - worker.work_started_at
    if elapsed <= running:
        return running - elapsed + queued
    if running <= 0.0:  # a prediction that underflowed to nothing gives no ratio to scale by
        return elapsed + queued
    return max(elapsed - running, OVERRUN_FLOOR * running) + queued * elapsed / running


class LeastWork:
    """Earliest predicted finish: the worker's remaining backlog + this request's time.

    Unlike least-request it knows that a 4K video is not a thumbnail and that a worker twice
    as fast should take twice the work. A request's time is the worker's overhead plus its
    per-unit time x the cost (`speed.SpeedEstimate.effective`). The backlog shrinks while
    the worker runs: a worker halfway through a long job is closer to free than one that just
    took it (the worker runs its requests one at a time, and `work_started_at` is when the
    current one began). A worker that overruns its prediction does not look free: its
    backlog grows with the overrun (`remaining_work`). Ties go to the worker with fewer
    requests in flight, then rotate. Above `SAMPLE_ABOVE` candidates it compares a random
    sample (see `_sample`).

    Exploration: predictions are only as good as the evidence, and a worker nobody sends
    work to never corrects a wrong one. So when the best choice is busy (the request would
    wait), an idle worker goes first if its estimate is unsure (few or old samples) or it
    has been idle `EXPLORE_IDLE_S`, and it would finish within `EXPLORE_SLACK` x the best.
    Both are bounded: only idle workers are tried, an unsure one becomes sure after a few
    requests, an idle one stops being idle, and no request is predicted to take more than
    `EXPLORE_SLACK` x as long as it would have. The bound holds for unsure workers too:
    their prediction is the pool's figure drawn toward their few samples, which is what
    there is to go on; without it any request, a 50-step 1024x1024 image included, went to
    a worker four times slower for no other reason than that worker being unsure.
    """

    name = "least-work"
    predictive = True

    def __init__(self, rng: random.Random | None = None) -> None:
        self._turn = 0
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Worker], cost: float, prior: Prior, now: float) -> Worker:
        best: list[Worker] = []
        best_finish, best_in_flight = math.inf, 0
        idle: list[tuple[Worker, float]] = []
        for worker in _sample(candidates, self._rng):
            finish = predicted_finish(worker, cost, prior, now)
            if not worker.in_flight:
                idle.append((worker, finish))
            if abs(finish - best_finish) <= 1e-9 * finish:
                if worker.in_flight < best_in_flight:
                    best, best_in_flight = [worker], worker.in_flight
                elif worker.in_flight == best_in_flight:
                    best.append(worker)
            elif finish < best_finish:
                best, best_finish, best_in_flight = [worker], finish, worker.in_flight
        self._turn += 1
        chosen = best[self._turn % len(best)]
        if chosen.in_flight:
            for worker, finish in sorted(idle, key=lambda pair: pair[0].work_started_at):
                if finish <= EXPLORE_SLACK * best_finish and (
                    worker.speed.unsure(now) or now - worker.work_started_at >= EXPLORE_IDLE_S
                ):
                    return worker
        return chosen


class LeastRequest:
    """Fewest in-flight requests; ties rotate so equal workers share the load evenly."""

    name = "least-request"
    predictive = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._turn = 0
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Worker], cost: float, prior: Prior, now: float) -> Worker:
        candidates = _sample(candidates, self._rng)
        lowest = min(w.in_flight for w in candidates)
        tied = [w for w in candidates if w.in_flight == lowest]
        self._turn += 1
        return tied[self._turn % len(tied)]


class RoundRobin:
    name = "round-robin"
    predictive = False

    def __init__(self) -> None:
        self._turn = -1

    def choose(self, candidates: Sequence[Worker], cost: float, prior: Prior, now: float) -> Worker:
        self._turn += 1
        return candidates[self._turn % len(candidates)]


class Random:
    name = "random"
    predictive = False

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Worker], cost: float, prior: Prior, now: float) -> Worker:
        return self._rng.choice(candidates)


POLICIES: dict[str, Callable[[], Policy]] = {
    LeastWork.name: LeastWork,
    LeastRequest.name: LeastRequest,
    RoundRobin.name: RoundRobin,
    Random.name: Random,
}


def make_policy(name: str) -> Policy:
    return POLICIES[name]()
