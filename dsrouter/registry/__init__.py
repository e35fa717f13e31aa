"""The registry: the single owner of worker state and in-flight counts.

Invariant: every mutation of a `Worker` happens inside a synchronous method of this
package. Trio switches tasks only at `await`, so each such method runs atomically with
respect to every other task: request handlers, health probes and the launcher can call them
freely without locks, and no count can be observed half-updated. Code outside this package
reads `Worker` fields but never assigns them; it goes through `Registry`.

Who assigns which `Worker` field (one file each, `worker.py` only defines them):

- `registry.py` (`Registry`, membership): `draining`, `remove_when_idle`, `managed`,
  `capabilities`, and `routing_epoch` at registration.
- `breaker.py` (`Breaker`, probes and the circuit breaker): `health`,
  `consecutive_failures`, `consecutive_successes`, `last_probe_at`, `probe_latency_s`,
  `quarantined_by_operator`, `opened_at`, `half_open_after`, `tripped_by_requests`,
  `trial_in_flight`, and `last_error`, which `weights.py` also sets when a refit fails.
- `dispatch.py` (`Dispatcher`, the router queue and leases): `in_flight`,
  `realtime_sessions`, `requests_total`, `outstanding_cost`, `lease_costs`,
  `work_started_at`, `last_completion_at`, `speed`.
- `weights.py` (`PoolWeights`, versions and sleep): `weights`, `stale`, `sleeping`.

The parts talk through the `Registry` that builds them: a health transition
(`Breaker` -> `Registry._health_changed`) asks for a capability refresh and a weight check;
every change that may free capacity ends in `Registry._notify`, which serves the queue and
wakes `Registry.changed` watchers.
"""

from dsrouter.registry.dispatch import (
    ASLEEP_RETRY_AFTER_S,
    Lease,
    NoWorkerAvailable,
    PoolAsleep,
    QueueFull,
    QueuePlace,
    QueueTimeout,
)
from dsrouter.registry.registry import CapabilityProber, CatchUp, Registry
from dsrouter.registry.worker import Capabilities, Health, Worker, video_support_from
from dsrouter.workers_http.readiness import ProbeOutcome

__all__ = [
    "ASLEEP_RETRY_AFTER_S",
    "Capabilities",
    "CapabilityProber",
    "CatchUp",
    "Health",
    "Lease",
    "NoWorkerAvailable",
    "PoolAsleep",
    "ProbeOutcome",
    "QueueFull",
    "QueuePlace",
    "QueueTimeout",
    "Registry",
    "Worker",
    "video_support_from",
]
