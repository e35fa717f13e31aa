"""Routing decisions at DEBUG level: which candidates a policy saw and which it chose.

`traced` wraps any `policies.Policy` without changing it, so every policy gets the same line
(`--verbose` or `logging.level = "debug"` shows it; at INFO nothing is formatted):

    routing least-work, cost 30.7: chose 10.0.0.2:30000 of 10.0.0.1:30000 (in flight 1,
    finish ~12.3 s), 10.0.0.2:30000 (in flight 0, finish ~1.2 s)

"finish" is the request's predicted completion on that worker: its backlog plus this
request's work at the worker's learned speed, the estimate least-work ranks by.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from dsrouter.policies import Policy, predicted_finish

if TYPE_CHECKING:
    from dsrouter.registry import Worker
    from dsrouter.speed import Prior

log = logging.getLogger("dsrouter.routing")


class TracedPolicy:
    """A policy whose every choice is logged at DEBUG."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.name = policy.name
        self.predictive = policy.predictive

    def choose(self, candidates: Sequence[Worker], cost: float, prior: Prior, now: float) -> Worker:
        chosen = self.policy.choose(candidates, cost, prior, now)
        if log.isEnabledFor(logging.DEBUG):
            seen = ", ".join(
                f"{w.display_id} (in flight {w.in_flight}, "
                f"finish ~{predicted_finish(w, cost, prior, now):.3g} s)"
                for w in candidates
            )
            log.debug(
                "routing %s, cost %.3g: chose %s of %s", self.name, cost, chosen.display_id, seen
            )
        return chosen


def traced(policy: Policy) -> Policy:
    return TracedPolicy(policy)
