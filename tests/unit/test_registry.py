import pytest
import trio

from dsrouter.config import HealthConfig, RoutingConfig
from dsrouter.policies import LeastRequest, RoundRobin
from dsrouter.registry import Health, ProbeOutcome, QueueFull, Registry, video_support_from

URL = "http://w:1"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def registry(clock: Clock | None = None, **health: float) -> Registry:
    reg = Registry(HealthConfig(**health), LeastRequest(), clock=clock or Clock())
    reg.add(URL)
    return reg


def test_new_worker_is_starting_until_its_first_good_probe() -> None:
    reg = registry()
    worker = reg.by_url(URL)
    for outcome in (ProbeOutcome.REFUSED, ProbeOutcome.WARMING, ProbeOutcome.REFUSED):
        reg.apply_probe(URL, outcome)
    assert worker.health is Health.STARTING and not worker.routable
    reg.apply_probe(URL, ProbeOutcome.OK)
    assert worker.health is Health.HEALTHY and worker.routable


def test_quarantine_after_threshold_and_recovery_after_successes() -> None:
    reg = registry(failure_threshold=3, recovery_threshold=2)
    worker = reg.by_url(URL)
    reg.apply_probe(URL, ProbeOutcome.OK)
    reg.apply_probe(URL, ProbeOutcome.FAILED, "boom")
    reg.apply_probe(URL, ProbeOutcome.REFUSED)
    assert worker.health is Health.HEALTHY
    reg.apply_probe(URL, ProbeOutcome.FAILED)
    assert worker.health is Health.DEAD and worker.consecutive_failures == 3
    reg.apply_probe(URL, ProbeOutcome.OK)
    assert worker.health is Health.DEAD
    reg.apply_probe(URL, ProbeOutcome.OK)
    assert worker.health is Health.HEALTHY and worker.consecutive_failures == 0


def test_a_success_resets_the_failure_streak() -> None:
    reg = registry(failure_threshold=2)
    reg.apply_probe(URL, ProbeOutcome.OK)
    for _ in range(5):
        reg.apply_probe(URL, ProbeOutcome.FAILED)
        reg.apply_probe(URL, ProbeOutcome.OK)
    assert reg.by_url(URL).health is Health.HEALTHY


def test_adding_the_same_url_twice_keeps_one() -> None:
    reg = registry()
    worker, created = reg.add(URL)
    assert not created and worker is reg.by_url(URL) and len(reg.workers()) == 1


async def test_lease_releases_exactly_once() -> None:
    reg = registry()
    reg.apply_probe(URL, ProbeOutcome.OK)
    lease = await reg.acquire()
    lease.release()
    lease.release()
    assert reg.by_url(URL).in_flight == 0


async def test_lease_is_released_when_the_request_is_cancelled() -> None:
    reg = registry()
    reg.apply_probe(URL, ProbeOutcome.OK)
    entered = trio.Event()

    async def request() -> None:
        with await reg.acquire():
            entered.set()
            await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(request)
        await entered.wait()
        assert reg.by_url(URL).in_flight == 1
        nursery.cancel_scope.cancel()
    assert reg.by_url(URL).in_flight == 0


async def test_lease_is_released_when_the_request_fails() -> None:
    reg = registry()
    reg.apply_probe(URL, ProbeOutcome.OK)
    with pytest.raises(RuntimeError), await reg.acquire():
        raise RuntimeError("upstream broke")
    assert reg.by_url(URL).in_flight == 0


def test_removing_a_worker_forgets_its_jobs() -> None:
    reg = registry()
    reg.jobs.remember("job-1", URL, "videos")
    reg.jobs.remember("job-2", "http://other:1", "videos")
    reg.remove(URL)
    assert reg.jobs.owner("job-1") is None
    assert reg.jobs.owner("job-2") == "http://other:1"


def test_sleeping_worker_marked_dead_wakes_healthy() -> None:
    reg = registry()
    worker = reg.by_url(URL)
    reg.apply_probe(URL, ProbeOutcome.OK)
    reg.set_sleeping(worker, True)
    reg.set_dead(worker, True)
    reg.set_sleeping(worker, False)
    assert worker.routable


@pytest.mark.parametrize(
    ("tasks", "outputs", "expected"),
    [
        (["T2I"], [], False),
        (["TI2I"], [], False),
        (["T2V"], [], True),
        (["TI2V", "T2I", "V2V"], [], True),
        (["T2I", "T2V"], ["IMAGE", "VIDEO"], True),
        (["I2M"], ["MESH"], False),
        ([], [], None),
    ],
)
def test_video_support_follows_task_and_output_types(tasks, outputs, expected) -> None:
    assert video_support_from(tasks, outputs) is expected


def test_request_failures_open_the_breaker_and_a_trial_closes_it() -> None:
    clock = Clock()
    reg = registry(clock, failure_threshold=2, breaker_open_s=10)
    reg.add("http://other:1")
    worker, other = reg.workers()
    for w in (worker, other):
        reg.apply_probe(w.url, ProbeOutcome.OK)
    reg.record_result(worker, False, "connect refused")
    assert worker.routable
    reg.record_result(worker, False, "connect refused")
    assert worker.health is Health.DEAD
    assert reg.routable() == [other]
    clock.now = 9.9
    assert reg.routable() == [other]
    clock.now = 10.0
    assert reg.routable() == [worker, other]
    trial = reg.lease_worker(worker)
    assert trial.trial and reg.routable() == [other]
    reg.record_result(worker, True)
    trial.release()
    assert worker.health is Health.HEALTHY and reg.routable() == [worker, other]


def test_a_failed_trial_reopens_the_breaker() -> None:
    clock = Clock()
    reg = registry(clock, failure_threshold=1, breaker_open_s=5, max_ejection_percent=100)
    worker = reg.by_url(URL)
    reg.apply_probe(URL, ProbeOutcome.OK)
    reg.record_result(worker, False)
    clock.now = 6
    with reg.lease_worker(worker):
        reg.record_result(worker, False)
    assert worker.health is Health.DEAD and reg.routable() == []
    clock.now = 10.9
    assert reg.routable() == []
    clock.now = 11
    assert reg.routable() == [worker]


def test_good_probes_alone_do_not_close_a_breaker_that_failed_requests_opened() -> None:
    clock = Clock()
    reg = registry(
        clock,
        failure_threshold=2,
        recovery_threshold=2,
        breaker_open_s=10,
        max_ejection_percent=100,
    )
    worker = reg.by_url(URL)
    reg.apply_probe(URL, ProbeOutcome.OK)
    reg.record_result(worker, False, "answered 503")
    reg.record_result(worker, False, "answered 503")
    for _ in range(5):  # /health says 200 while generations fail
        reg.apply_probe(URL, ProbeOutcome.OK)
    assert worker.health is Health.DEAD and reg.routable() == []
    clock.now = 10.0
    reg.apply_probe(URL, ProbeOutcome.OK)  # the half-open probe closes it
    assert worker.health is Health.HEALTHY


@pytest.mark.parametrize(
    ("pool", "percent", "ejectable"),
    [(1, 50, 0), (2, 50, 1), (4, 50, 2), (5, 50, 2), (3, 0, 0), (3, 100, 3)],
)
def test_failed_requests_eject_at_most_max_ejection_percent_of_the_pool(
    pool: int, percent: int, ejectable: int
) -> None:
    reg = Registry(
        HealthConfig(failure_threshold=1, max_ejection_percent=percent),
        LeastRequest(),
        clock=Clock(),
    )
    for index in range(pool):
        reg.add(f"http://w:{index + 1}")
        reg.apply_probe(f"http://w:{index + 1}", ProbeOutcome.OK)
    for worker in reg.workers():
        reg.record_result(worker, False, "answered 503")
        reg.record_result(worker, False, "answered 503")
    dead = [w for w in reg.workers() if w.health is Health.DEAD]
    assert len(dead) == ejectable
    for index in range(pool):  # probes still take out a worker that is really gone
        for _ in range(3):
            reg.apply_probe(f"http://w:{index + 1}", ProbeOutcome.REFUSED)
    assert all(w.health is Health.DEAD for w in reg.workers())


def test_a_breaker_worker_whose_probes_fail_too_recovers_by_probes() -> None:
    reg = registry(failure_threshold=1, recovery_threshold=2, breaker_open_s=100)
    worker = reg.by_url(URL)
    reg.apply_probe(URL, ProbeOutcome.OK)
    reg.record_result(worker, False, "connect refused")
    reg.apply_probe(URL, ProbeOutcome.REFUSED)  # it really is down (restarting)
    reg.apply_probe(URL, ProbeOutcome.OK)
    reg.apply_probe(URL, ProbeOutcome.OK)
    assert worker.health is Health.HEALTHY


def test_operator_quarantine_never_half_opens() -> None:
    clock = Clock()
    reg = registry(clock, breaker_open_s=1)
    worker = reg.by_url(URL)
    reg.apply_probe(URL, ProbeOutcome.OK)
    reg.set_dead(worker, True)
    clock.now = 100
    for _ in range(5):
        reg.apply_probe(URL, ProbeOutcome.OK)
    assert worker.health is Health.DEAD and reg.routable() == []
    reg.set_dead(worker, False)
    assert worker.routable


async def test_draining_worker_takes_no_new_requests_and_leaves_once_idle() -> None:
    reg = registry()
    worker = reg.by_url(URL)
    reg.apply_probe(URL, ProbeOutcome.OK)
    lease = await reg.acquire()
    reg.set_draining(worker, True, remove_when_idle=True)
    assert reg.routable() == [] and reg.by_url(URL) is worker
    lease.release()
    assert reg.by_url(URL) is None


def test_draining_worker_can_be_kept_and_undrained() -> None:
    reg = registry()
    worker = reg.by_url(URL)
    reg.apply_probe(URL, ProbeOutcome.OK)
    reg.set_draining(worker, True, remove_when_idle=False)
    assert reg.by_url(URL) is worker and not worker.routable and worker.state == "draining"
    reg.set_draining(worker, False, remove_when_idle=False)
    assert worker.routable


def test_routable_cache_follows_every_state_change() -> None:
    clock = Clock()
    reg = registry(clock, failure_threshold=1, breaker_open_s=10)
    reg.add("http://v:1")
    worker, other = reg.by_url(URL), reg.by_url("http://v:1")
    assert reg.routable() == []
    reg.apply_probe(URL, ProbeOutcome.OK)
    reg.apply_probe("http://v:1", ProbeOutcome.OK)
    assert reg.routable() == [worker, other]
    reg.set_draining(other, True, False)
    assert reg.routable() == [worker]
    reg.set_draining(other, False, False)
    reg.apply_probe(URL, ProbeOutcome.FAILED, "boom")
    assert reg.routable() == [other]
    clock.now = 10.5
    assert reg.routable() == [worker, other], "half-open after breaker_open_s, no event"
    reg.remove("http://v:1")
    assert reg.routable() == [worker]


async def test_reconfigure_applies_new_thresholds_limits_and_policy() -> None:
    reg = Registry(HealthConfig(failure_threshold=5), RoundRobin(), clock=Clock())
    w, v = reg.add(URL)[0], reg.add("http://v:1")[0]
    for worker in (w, v):
        reg.apply_probe(worker.url, ProbeOutcome.OK)
    assert (await reg.acquire()).worker is w
    reg.reconfigure(
        HealthConfig(failure_threshold=1),
        RoutingConfig(max_inflight_per_worker=1, queue_size=0),
        1.0,
    )
    assert (await reg.acquire()).worker is v, "no new policy: round-robin goes on where it was"
    with pytest.raises(QueueFull):
        await reg.acquire()
    reg.apply_probe(URL, ProbeOutcome.FAILED)
    assert w.health is Health.DEAD
    reg.reconfigure(HealthConfig(), RoutingConfig(), 1.0, RoundRobin())
    assert [(await reg.acquire()).worker for _ in range(2)] == [v, v]
