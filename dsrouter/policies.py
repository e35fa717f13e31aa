"""Routing policies: pick one worker from the routable candidates.

A policy sees only the candidates the registry hands it (already filtered for routability and
capability) and their load; adding a policy means one class here and one line in `POLICIES`.
Policies are called synchronously from `Registry.lease`, so their own state cannot race.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from dsrouter.registry import Worker


class Policy(Protocol):
    name: str

    def choose(self, candidates: Sequence[Worker]) -> Worker:
        """Return one of `candidates` (never empty)."""
        ...


class LeastRequest:
    """Fewest in-flight requests; ties rotate so equal workers share the load evenly."""

    name = "least-request"

    def __init__(self) -> None:
        self._turn = 0

    def choose(self, candidates: Sequence[Worker]) -> Worker:
        lowest = min(w.in_flight for w in candidates)
        tied = [w for w in candidates if w.in_flight == lowest]
        self._turn += 1
        return tied[self._turn % len(tied)]


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._turn = -1

    def choose(self, candidates: Sequence[Worker]) -> Worker:
        self._turn += 1
        return candidates[self._turn % len(candidates)]


class Random:
    name = "random"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(self, candidates: Sequence[Worker]) -> Worker:
        return self._rng.choice(candidates)


POLICIES: dict[str, Callable[[], Policy]] = {
    LeastRequest.name: LeastRequest,
    RoundRobin.name: RoundRobin,
    Random.name: Random,
}


def make_policy(name: str) -> Policy:
    return POLICIES[name]()
