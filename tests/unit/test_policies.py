import random
from collections import Counter

import pytest

from dsrouter.config import HealthConfig
from dsrouter.policies import POLICIES, LeastRequest, Policy, Random, RoundRobin, make_policy
from dsrouter.registry import NoWorkerAvailable, ProbeOutcome, Registry
from dsrouter.speed import Prior


def pool(n: int, policy: Policy | str = "least-request") -> Registry:
    if isinstance(policy, str):
        policy = make_policy(policy)
    registry = Registry(HealthConfig(), policy, clock=lambda: 0.0)
    for i in range(n):
        registry.add(f"http://w{i}:1")
        registry.apply_probe(f"http://w{i}:1", ProbeOutcome.OK)
    return registry


async def test_least_request_prefers_the_idle_worker() -> None:
    registry = pool(3)
    w0, w1, w2 = registry.workers()
    registry.lease_worker(w0)
    registry.lease_worker(w2)
    assert (await registry.acquire()).worker is w1


async def test_least_request_spreads_ties_evenly() -> None:
    registry = pool(4)
    counts = Counter()
    for _ in range(400):
        with await registry.acquire() as lease:
            counts[lease.worker.url] += 1
    assert set(counts.values()) == {100}


async def test_least_request_under_concurrency_keeps_counts_balanced() -> None:
    registry = pool(3)
    leases = [await registry.acquire() for _ in range(9)]
    assert [w.in_flight for w in registry.workers()] == [3, 3, 3]
    for lease in leases:
        lease.release()
    assert [w.in_flight for w in registry.workers()] == [0, 0, 0]


async def test_round_robin_cycles_in_order() -> None:
    registry = pool(3, "round-robin")
    picks = []
    for _ in range(6):
        with await registry.acquire() as lease:
            picks.append(lease.worker.url)
    assert picks == ["http://w0:1", "http://w1:1", "http://w2:1"] * 2


async def test_random_uses_every_worker() -> None:
    registry = pool(3, Random(random.Random(7)))
    seen = {(await registry.acquire()).worker.url for _ in range(60)}
    assert len(seen) == 3


async def test_unroutable_workers_are_never_chosen() -> None:
    registry = pool(3)
    registry.add("http://starting:1")
    w0, w1, w2, _ = registry.workers()
    registry.set_dead(w0, True)
    registry.set_sleeping(w1, True)
    assert {(await registry.acquire()).worker.url for _ in range(10)} == {w2.url}
    registry.set_draining(w2, True, remove_when_idle=False)
    with pytest.raises(NoWorkerAvailable, match="No healthy workers available in the pool"):
        await registry.acquire()


def test_every_policy_is_registered() -> None:
    assert set(POLICIES) == {"least-work", "least-request", "round-robin", "random"}
    assert isinstance(make_policy("least-request"), LeastRequest)
    assert isinstance(make_policy("round-robin"), RoundRobin)


def test_large_pools_compare_a_sample_and_still_avoid_loaded_workers() -> None:
    from dsrouter.policies import LeastWork

    registry = pool(200)
    workers = registry.workers()
    for worker in workers[::2]:
        for _ in range(10):
            registry.lease_worker(worker, 5.0)
    idle = {id(w) for w in workers[1::2]}
    for policy in (LeastRequest(random.Random(3)), LeastWork(random.Random(3))):
        chosen = [policy.choose(workers, 1.0, Prior(0.01), 0.0) for _ in range(300)]
        assert all(id(w) in idle for w in chosen)
        assert len({id(w) for w in chosen}) > 50, "the sample moves across the pool"
