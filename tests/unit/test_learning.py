"""Issue 14: a service-time model that tiny or lying requests cannot poison, exploration of
idle workers, and costs read the way the worker reads the request."""

import json
import math

import pytest

from dsrouter.config import CostConfig
from dsrouter.cost import CostModel, read_fields
from dsrouter.policies import EXPLORE_IDLE_S
from dsrouter.registry import Registry, Worker
from dsrouter.speed import AGE_S, Prior, SpeedEstimate
from tests.unit.test_scheduling import Clock, learn, pool

TINY = 16 * 16 / 1e6
BIG = 1024 * 1024 / 1e6 * 50
PRIOR = Prior(0.1, 0.005)


def trained(spu: float, overhead: float = 0.005) -> SpeedEstimate:
    speed = SpeedEstimate()
    for _ in range(30):
        for cost in (TINY, 5.0, BIG):
            speed.observe(cost, overhead + spu * cost, PRIOR, now=0.0)
    return speed


def test_the_model_learns_a_fixed_overhead_and_a_per_unit_time() -> None:
    speed = trained(0.4, overhead=0.02)
    spu, overhead = speed.effective(PRIOR, now=0.0)
    assert spu == pytest.approx(0.4, rel=0.05)
    assert overhead == pytest.approx(0.02, rel=0.2)


def test_tiny_requests_move_the_overhead_not_the_per_unit_time() -> None:
    speed = trained(0.1)
    before, _ = speed.effective(PRIOR, now=0.0)
    for _ in range(8):
        speed.observe(TINY, 0.012, PRIOR, now=0.0)  # a slower network, not a slower GPU
    after, overhead = speed.effective(PRIOR, now=0.0)
    assert after == pytest.approx(before, rel=0.01)
    assert overhead > 0.008


def test_the_first_sample_is_bounded_like_every_other() -> None:
    speed = SpeedEstimate()
    speed.observe(BIG, 1000 * 0.1 * BIG, PRIOR, now=0.0)
    spu, _ = speed.effective(PRIOR, now=0.0)
    assert PRIOR.seconds_per_unit < spu <= 4 * PRIOR.seconds_per_unit


def test_a_worker_looks_far_from_the_pool_median_only_after_many_consistent_samples() -> None:
    speed = SpeedEstimate()
    for _ in range(6):
        speed.observe(BIG, 0.001 * BIG, PRIOR, now=0.0)  # 100x faster than the pool
    spu, _ = speed.effective(PRIOR, now=0.0)
    assert spu > PRIOR.seconds_per_unit / 20
    for _ in range(60):
        speed.observe(BIG, 0.001 * BIG, PRIOR, now=0.0)
    spu, _ = speed.effective(PRIOR, now=0.0)
    assert spu == pytest.approx(0.001, rel=0.1)


def test_a_new_worker_four_times_faster_than_the_pool_shows_it_after_one_request() -> None:
    speed = SpeedEstimate()
    speed.observe(BIG, 0.005 + 0.025 * BIG, PRIOR, now=0.0)
    spu, _ = speed.effective(PRIOR, now=0.0)
    assert spu == pytest.approx(0.025, rel=0.1)


def test_an_early_outlier_counts_as_one_sample_of_the_average() -> None:
    speed = SpeedEstimate()
    speed.observe(BIG, 1000 * 0.1 * BIG, PRIOR, now=0.0)  # a first sample 1000x off
    for _ in range(2):
        speed.observe(BIG, 0.005 + 0.1 * BIG, PRIOR, now=0.0)
    spu, _ = speed.effective(PRIOR, now=0.0)
    assert 0.1 < spu < 0.1 * 1.6
    for _ in range(6):
        speed.observe(BIG, 0.005 + 0.1 * BIG, PRIOR, now=0.0)
    spu, _ = speed.effective(PRIOR, now=0.0)
    assert spu == pytest.approx(0.1, rel=0.1)


def test_tiny_requests_do_not_use_up_the_fast_start_of_the_per_unit_time() -> None:
    """A tiny warm-up is evidence about the overhead only: the first real request still
    counts as the first sample of the per-unit time."""
    speed = SpeedEstimate()
    for _ in range(8):
        speed.observe(TINY, 0.005, PRIOR, now=0.0)
    assert speed.unsure(now=0.0)
    speed.observe(BIG, 0.005 + 0.025 * BIG, PRIOR, now=0.0)
    spu, overhead = speed.effective(PRIOR, now=0.0)
    assert spu == pytest.approx(0.025, rel=0.1)
    assert overhead == pytest.approx(0.005, rel=0.2)


def test_a_speed_change_is_followed_within_a_few_requests() -> None:
    for factor in (4.0, 0.25):
        speed = trained(0.1)
        for _ in range(5):
            speed.observe(BIG, 0.005 + 0.1 * factor * BIG, PRIOR, now=0.0)
        spu, _ = speed.effective(PRIOR, now=0.0)
        assert spu / (0.1 * factor) == pytest.approx(1.0, rel=0.3)


def test_estimates_decay_toward_the_pool_when_not_refreshed() -> None:
    speed = trained(0.4)
    assert not speed.unsure(now=0.0)
    fresh, _ = speed.effective(PRIOR, now=0.0)
    aged, _ = speed.effective(PRIOR, now=10 * AGE_S)
    assert fresh == pytest.approx(0.4, rel=0.05)
    assert aged == pytest.approx(PRIOR.seconds_per_unit, rel=0.01)
    assert speed.unsure(now=10 * AGE_S)


def test_a_tiny_warm_up_does_not_starve_the_fast_worker() -> None:
    """The issue's first finding: 16x16 one-step requests used to invert the ranking."""
    clock = Clock()
    registry = pool(2, clock)
    fast, slow = registry.workers()
    for worker, slowness in ((fast, 1.0), (slow, 4.0)):
        for i in range(8):
            registry.observe(worker, TINY, started=i, finished=i + 0.004 + TINY * 0.01 * slowness)
        for i in range(3):
            registry.observe(
                worker, BIG, started=10 + i * 10, finished=10 + i * 10 + BIG * 0.01 * slowness
            )
    clock.now = 100.0
    assert (
        fast.speed.effective(registry._dispatch.prior(), clock.now)[0]
        < (slow.speed.effective(registry._dispatch.prior(), clock.now)[0])
    )


async def test_an_idle_unsure_worker_gets_a_request_that_would_wait_elsewhere() -> None:
    clock = Clock()
    registry = pool(2, clock)
    known, fresh = registry.workers()
    learn(known, 1.0)
    learn(fresh, 3.0)  # 3 s for the request; known finishes it at 2 s, after its backlog
    fresh.speed.samples = 1.0  # but on little evidence
    registry.lease_worker(known, 1.0)
    assert (await registry.acquire(cost=1.0)).worker is fresh


async def test_an_unsure_worker_is_not_given_a_request_it_would_finish_far_later() -> None:
    clock = Clock()
    registry = pool(2, clock)
    known, fresh = registry.workers()
    learn(known, 1.0)
    learn(fresh, 4.5)  # 4.5 s for the request, more than twice known's 2 s
    fresh.speed.samples = 1.0
    registry.lease_worker(known, 1.0)
    assert fresh.speed.unsure(clock.now)
    assert (await registry.acquire(cost=1.0)).worker is known


async def test_a_long_idle_worker_gets_work_that_would_wait_elsewhere() -> None:
    clock = Clock()
    registry = pool(2, clock, max_inflight_per_worker=1)
    fast, slower = registry.workers()
    learn(fast, 1.0)
    learn(slower, 2.5)
    running = await registry.acquire(cost=1.0)
    assert running.worker is fast
    assert await _placed(registry, cost=1.0) is None  # fast finishes it sooner: wait for it
    clock.now = EXPLORE_IDLE_S
    assert await _placed(registry, cost=1.0) is slower


async def _placed(registry: Registry, cost: float) -> Worker | None:
    worker, _ = registry._dispatch._place(None, frozenset(), cost)
    return worker


def test_a_worker_slower_than_the_slack_is_not_forced_to_work() -> None:
    clock = Clock()
    registry = pool(2, clock, max_inflight_per_worker=1)
    fast, slow = registry.workers()
    learn(fast, 1.0)
    learn(slow, 8.0)
    registry.lease_worker(fast, 1.0)
    clock.now = EXPLORE_IDLE_S + 0.5
    assert registry._dispatch._place(None, frozenset(), 1.0)[0] is None


IMAGE = "/v1/images/generations"


@pytest.mark.parametrize(
    ("payload", "units"),
    [
        ({"width": True, "height": True, "size": "4096x4096"}, 1e-6 * 30),
        ({"size": " 512x512 ", "num_inference_steps": "20"}, 0.512**2 * 20),
        ({"width": 512, "size": "256x256"}, 0.256**2 * 30),
        ({"width": 512}, 1.048576 * 30),
        ({"num_inference_steps": 7.9, "size": "1000x1000"}, 7.0),
        ({"n": 0, "size": "1000x1000"}, 30.0),
        ({"n": 50, "size": "1000x1000"}, 300.0),
        ({"n": None, "num_outputs_per_prompt": 3, "size": "1000x1000"}, 30.0),
        ({"num_outputs_per_prompt": 3, "size": "1000x1000"}, 90.0),
        ({"num_frames": 4, "size": "1000x1000"}, 120.0),
        ({"size": None}, 1.048576 * 30),
        ({"size": ""}, 1.048576 * 30),
        ({"n": "many"}, 0.0),
        ({"width": 0, "height": 10}, 0.0),
        ({"size": "4097x16"}, 0.0),
        ({"size": "512 x 512"}, 0.0),
        ({"size": 512}, 0.0),
        ({"num_inference_steps": "7.5"}, 0.0),
        ({"num_inference_steps": -1}, 0.0),
        ({"num_inference_steps": [1]}, 0.0),
    ],
)
def test_image_cost_is_read_with_the_workers_rules(payload: dict, units: float) -> None:
    model = CostModel(CostConfig())
    assert model.from_params(payload, video=False) == pytest.approx(units)


def test_video_cost_follows_seconds_fps_and_frames() -> None:
    model = CostModel(CostConfig())
    base = 0.832 * 0.48 * 30
    assert model.from_params({}, video=True) == pytest.approx(base * 96)
    assert model.from_params({"seconds": "2", "fps": 8}, video=True) == pytest.approx(base * 16)
    assert model.from_params({"num_frames": 5, "seconds": 100}, video=True) == pytest.approx(
        base * 5
    )
    assert model.from_params({"num_frames": 5, "fps": "x"}, video=True) == 0.0


@pytest.mark.parametrize(
    "body",
    [
        b'{"num_inference_steps": 1e400}',
        b'{"num_inference_steps": "' + b"9" * 5000 + b'"}',
        b'{"num_inference_steps": ' + b"9" * 400 + b', "num_frames": ' + b"9" * 400 + b"}",
        b'{"seconds": ' + b"9" * 400 + b', "fps": ' + b"9" * 400 + b"}",
        b'{"n": -1e999}',
        b"[" * 5000,
        b'{"width": {"a": 1}, "height": 2}',
        b'"just a string"',
    ],
)
def test_absurd_values_give_a_finite_price_and_never_raise(body: bytes) -> None:
    model = CostModel(CostConfig())
    for path in (IMAGE, "/v1/videos"):
        units = model.estimate(path, body, "application/json")
        assert math.isfinite(units) and units >= 0


def test_multipart_text_fields_are_read_like_json_ones() -> None:
    boundary = "b0undary"
    parts = [("model", "sim/A"), ("seconds", "2"), ("size", "64x32")]
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in parts
    )
    body += (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="input_reference"; '
            f'filename="a.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + b"\x89PNG" * 100
        + f"\r\n--{boundary}--\r\n".encode()
    )
    fields = read_fields(body, f"multipart/form-data; boundary={boundary}")
    assert fields == dict(parts)
    cost = CostModel(CostConfig()).estimate(
        "/v1/videos", body, f"multipart/form-data; boundary={boundary}"
    )
    assert cost == pytest.approx(0.064 * 0.032 * 30 * 48)
    assert read_fields(body[:20], f'multipart/form-data; boundary="{boundary}"') == {}
    assert read_fields(json.dumps([1]).encode(), "application/json") == {}


def test_poisoned_requests_cannot_make_a_worker_look_hundreds_of_times_faster() -> None:
    """The issue's second finding: 25 requests priced 4096 squared but rendered 1x1."""
    model = CostModel(CostConfig())
    poisoned = model.estimate(
        IMAGE, b'{"width": true, "height": true, "size": "4096x4096"}', "application/json"
    )
    speed = trained(0.1)
    for _ in range(25):
        speed.observe(poisoned, 0.005 + 0.1 * 1e-6 * 30, PRIOR, now=0.0)
    spu, _ = speed.effective(PRIOR, now=0.0)
    assert spu == pytest.approx(0.1, rel=0.05)
