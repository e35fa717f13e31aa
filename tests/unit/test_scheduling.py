import math

import pytest
import trio
import trio.testing

from dsrouter.config import CostConfig, HealthConfig, ModelCost, RoutingConfig
from dsrouter.cost import CostModel
from dsrouter.policies import LeastWork, predicted_finish, remaining_work
from dsrouter.registry import (
    NoWorkerAvailable,
    ProbeOutcome,
    QueueFull,
    QueuePlace,
    QueueTimeout,
    Registry,
    Worker,
)
from dsrouter.speed import Prior, SpeedEstimate, pool_prior


class Clock:
    """A hand-moved clock for the registry: pure-logic tests need no event loop."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pool(n: int, clock: Clock | None = None, **routing: object) -> Registry:
    registry = Registry(
        HealthConfig(),
        LeastWork(),
        routing=RoutingConfig(**routing),
        clock=clock or trio.current_time,
    )
    for i in range(n):
        registry.add(f"http://w{i}:1")
        registry.apply_probe(f"http://w{i}:1", ProbeOutcome.OK)
    return registry


def learn(worker: Worker, spu: float, overhead: float = 0.0, times: int = 12) -> None:
    """Teach `worker` a per-unit time (with `overhead`) from consistent samples."""
    for _ in range(times):
        for cost in (1.0, 10.0):
            worker.speed.observe(cost, overhead + spu * cost, Prior(spu, 0.05), now=0.0)


def fast_and_slow(clock: Clock, slow_spu: float) -> tuple[Registry, Worker, Worker]:
    """Two workers with learned speeds (1 s per unit, `slow_spu`), one request each at most."""
    registry = pool(2, clock, max_inflight_per_worker=1)
    fast, slow = registry.workers()
    learn(fast, 1.0)
    learn(slow, slow_spu)
    return registry, fast, slow


def test_cost_grows_with_pixels_steps_frames_and_outputs() -> None:
    model = CostModel(CostConfig())
    small = model.estimate(
        "/v1/images/generations",
        b'{"size": "512x512", "num_inference_steps": 10}',
        "application/json",
    )
    assert small == pytest.approx(0.512 * 0.512 * 10)
    big = model.estimate(
        "/v1/images/generations",
        b'{"width": 1024, "height": 1024, "num_inference_steps": 10, "n": 4}',
        "application/json",
    )
    assert big == pytest.approx(16 * small)
    video = model.estimate(
        "/v1/videos", b'{"size": "832x480", "seconds": 2, "fps": 16}', "application/json"
    )
    assert video == pytest.approx(0.832 * 0.48 * 30 * 32)


def test_cost_falls_back_to_defaults_and_per_model_overrides() -> None:
    model = CostModel(CostConfig(default_steps=20, models={"m": ModelCost(steps=50)}))
    default = model.estimate("/v1/images/generations", None, "multipart/form-data")
    assert default == pytest.approx(1.048576 * 20)
    assert model.estimate("/v1/images/generations", b"not json", "application/json") == default
    tuned = model.estimate("/v1/images/generations", b'{"model": "m"}', "application/json")
    assert tuned == pytest.approx(1.048576 * 50)


def test_speed_estimate_resists_outliers_and_tracks_slowdowns() -> None:
    speed = SpeedEstimate()
    prior = Prior(0.1, 0.0)
    for _ in range(20):
        speed.observe(10, 1.0, prior, now=0.0)
    assert speed.seconds_per_unit == pytest.approx(0.1, rel=0.05)
    speed.observe(10, 1000.0, prior, now=0.0)
    assert speed.seconds_per_unit < 0.2
    for _ in range(20):
        speed.observe(10, 3.0, prior, now=0.0)
    assert speed.seconds_per_unit == pytest.approx(0.3, rel=0.05)
    assert pool_prior([SpeedEstimate(), speed], 1.0).seconds_per_unit == speed.seconds_per_unit
    assert pool_prior([SpeedEstimate()], 1.0).seconds_per_unit == 1.0


async def test_least_work_prefers_the_faster_worker_until_its_backlog_outweighs_it() -> None:
    registry = pool(2, Clock())
    fast, slow = registry.workers()
    learn(fast, 1.0)
    learn(slow, 4.5)
    picks = [(await registry.acquire(cost=1.0)).worker for _ in range(5)]
    assert picks[:4] == [fast] * 4
    assert picks[4] is slow


async def test_least_work_counts_the_progress_of_the_running_job() -> None:
    clock = Clock()
    registry = pool(2, clock)
    a, b = registry.workers()
    for worker in (a, b):
        learn(worker, 1.0)
    registry.lease_worker(a, 10.0)
    clock.now = 8.0
    registry.lease_worker(b, 10.0)
    clock.now = 9.0
    # a has ~1 s of its job left, b ~9 s: same outstanding work, very different finish times
    assert (await registry.acquire(cost=1.0)).worker is a
    clock.now = 30.0
    # both overran their estimates: the one overrunning by more (a, 20 s) looks busier
    assert (await registry.acquire(cost=1.0)).worker is b


async def test_a_worker_overrunning_its_running_request_does_not_look_free() -> None:
    clock = Clock()
    registry = pool(2, clock)
    busy, slow = registry.workers()
    learn(busy, 1.0)
    learn(slow, 3.0)
    for _ in range(3):
        registry.lease_worker(busy, 1.0)
    clock.now = 3.0
    # busy's first request (predicted ~1 s) has run 3 s and two more wait behind it: the
    # time spent is not progress through those two, and they will likely run slow too
    assert (await registry.acquire(cost=1.0)).worker is slow


def test_requests_not_yet_started_always_count_in_full() -> None:
    registry = pool(1, Clock())
    (worker,) = registry.workers()
    learn(worker, 1.0)
    prior = Prior(1.0, 0.05)
    registry.lease_worker(worker, 2.0)
    registry.lease_worker(worker, 1.0)
    registry.lease_worker(worker, 1.0)
    for elapsed in (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 10.0):
        # the two 1-unit requests behind the running one: at least 2 s whatever has elapsed
        assert predicted_finish(worker, 0.0, prior, elapsed) >= 2.0, elapsed


def test_the_oldest_request_in_flight_is_the_one_running() -> None:
    clock = Clock()
    registry = pool(1, clock)
    (worker,) = registry.workers()
    first = registry.lease_worker(worker, 4.0)
    registry.lease_worker(worker, 1.0)
    assert worker.running_cost == 4.0
    clock.now = 4.0
    first.release()
    assert worker.running_cost == 1.0 and worker.work_started_at == 4.0


def test_observe_discounts_time_spent_behind_the_previous_request() -> None:
    one, other = pool(1), pool(1)
    queued, alone = one.workers()[0], other.workers()[0]
    one.observe(queued, 1.0, started=0.0, finished=2.0)
    one.observe(queued, 1.0, started=0.0, finished=4.0)
    other.observe(alone, 1.0, started=0.0, finished=2.0)
    other.observe(alone, 1.0, started=2.0, finished=4.0)
    assert queued.speed == alone.speed


async def test_queue_binds_late_to_the_first_worker_that_frees() -> None:
    registry = pool(2, max_inflight_per_worker=1)
    first = await registry.acquire()
    second = await registry.acquire()
    assert {first.worker, second.worker} == set(registry.workers())
    got: list[object] = []

    async def wait() -> None:
        got.append(await registry.acquire())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait)
        await trio.testing.wait_all_tasks_blocked()
        assert registry.summary()["queued"] == 1 and not got
        second.release()
    assert got[0].worker is second.worker and registry.summary()["queued"] == 0


async def test_queue_waits_for_a_faster_busy_worker_and_backfills_the_slow_one() -> None:
    clock = Clock()
    registry, fast, slow = fast_and_slow(clock, slow_spu=4.0)
    running = await registry.acquire(cost=1.0)
    assert running.worker is fast
    got: dict[str, Worker] = {}

    async def wait(name: str, cost: float) -> None:
        got[name] = (await registry.acquire(cost=cost)).worker

    async with trio.open_nursery() as nursery:
        # 2 units: done at 3 s on the fast worker once it is free, at 8 s on the slow one
        nursery.start_soon(wait, "big", 2.0)
        await trio.testing.wait_all_tasks_blocked()
        assert registry.summary()["queued"] == 1 and slow.in_flight == 0
        # a small request behind it is better off on the slow worker at once
        nursery.start_soon(wait, "small", 0.1)
        await trio.testing.wait_all_tasks_blocked()
        assert got == {"small": slow}
        running.release()
    assert got["big"] is fast and registry.summary()["queued"] == 0


async def test_requests_waiting_for_the_fast_worker_count_as_its_backlog() -> None:
    clock = Clock()
    registry, fast, slow = fast_and_slow(clock, slow_spu=2.5)
    running = await registry.acquire(cost=1.0)
    assert running.worker is fast
    got: dict[str, Worker] = {}

    async def wait(name: str) -> None:
        got[name] = (await registry.acquire(cost=1.0)).worker

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "first")  # fast: done at 2 s, slow: at 2.5 s -> waits
        await trio.testing.wait_all_tasks_blocked()
        assert not got
        # Behind it, the fast worker finishes this one at 3 s: the idle slow one is sooner.
        nursery.start_soon(wait, "second")
        await trio.testing.wait_all_tasks_blocked()
        assert got == {"second": slow}
        running.release()
    assert got["first"] is fast
    assert fast.outstanding_cost == pytest.approx(1.0) and slow.outstanding_cost == 1.0


async def test_a_request_held_for_a_worker_that_overruns_goes_elsewhere() -> None:
    clock = Clock()
    registry, fast, slow = fast_and_slow(clock, slow_spu=4.0)
    hung = await registry.acquire(cost=1.0)
    assert hung.worker is fast

    async def no_capabilities(url: str) -> None:
        return None

    async def no_catch_up(url: str) -> None:
        return None

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.run, no_capabilities, no_catch_up)
            waiting, placed = trio.Event(), trio.Event()
            got: list[Worker] = []

            async def wait() -> None:
                waiting.set()
                got.append((await registry.acquire(cost=2.0)).worker)
                placed.set()

            nursery.start_soon(wait)
            await waiting.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert not got, "held for the fast worker, predicted free in 1 s"
            clock.now = 60.0  # the fast worker is 59 s past its prediction
            await placed.wait()  # by the registry task's periodic re-dispatch
            nursery.cancel_scope.cancel()
    assert got == [slow]


async def test_queue_is_fifo_within_priority_and_priority_goes_first() -> None:
    registry = pool(1, max_inflight_per_worker=1)
    holder = await registry.acquire()
    order: list[str] = []

    async def wait(name: str, priority: int) -> None:
        lease = await registry.acquire(place=QueuePlace(priority=priority))
        order.append(name)
        lease.release()

    async with trio.open_nursery() as nursery:
        for name, priority in (("a", 0), ("b", 0), ("urgent", 5), ("c", 0)):
            nursery.start_soon(wait, name, priority)
            await trio.testing.wait_all_tasks_blocked()
        holder.release()
    assert order == ["urgent", "a", "b", "c"]


async def test_full_queue_refuses_and_timeout_gives_up() -> None:
    registry = pool(1, max_inflight_per_worker=1, queue_size=1, queue_timeout_s=5)
    await registry.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(registry.acquire)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(QueueFull):
            await registry.acquire()
        nursery.cancel_scope.cancel()
    assert registry.summary()["queued"] == 0


async def test_queue_timeout(autojump_clock: trio.abc.Clock) -> None:
    registry = pool(1, max_inflight_per_worker=1, queue_timeout_s=5)
    await registry.acquire()
    with pytest.raises(QueueTimeout):
        await registry.acquire()
    assert registry.summary()["queued"] == 0


async def test_cancelled_waiter_leaves_the_queue_and_loses_no_slot() -> None:
    registry = pool(1, max_inflight_per_worker=1)
    holder = await registry.acquire()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(registry.acquire)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    holder.release()
    assert registry.summary()["queued"] == 0
    assert registry.workers()[0].in_flight == 0
    lease = await registry.acquire()
    assert lease.worker.in_flight == 1


async def test_no_worker_at_all_fails_at_once() -> None:
    registry = pool(0)
    with pytest.raises(NoWorkerAvailable):
        await registry.acquire()
    assert math.isfinite(registry.routing.queue_timeout_s)


def test_remaining_work_of_a_request_predicted_at_nothing_is_its_elapsed_time() -> None:
    clock = Clock()
    registry = pool(1, clock)
    (worker,) = registry.workers()
    registry.lease_worker(worker, 0.0)
    registry.lease_worker(worker, 0.0)
    clock.now = 2.0
    assert remaining_work(worker, 1.0, 0.0, clock.now) == 2.0
