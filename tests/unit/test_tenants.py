"""Tenants (issue 20): keys to tenants, limits, priority classes and fair queuing.

Pure logic with a hand-moved clock; the 429s and class order over a real router are in
`tests/integration/test_tenants.py`.
"""

from collections import Counter
from pathlib import Path

import pytest
import trio
import trio.testing

from dsrouter.auth import Auth
from dsrouter.config import (
    MASK,
    ApiKey,
    ConfigError,
    SecurityConfig,
    TenantsConfig,
    dump_config,
    load_config,
)
from dsrouter.proxy import _queue_place
from dsrouter.registry import QueuePlace
from dsrouter.tenants import OverLimit, Quotas, Tenant, TokenBucket
from tests.unit.test_scheduling import Clock, pool


def bearer(key: str) -> bytes:
    return f"Bearer {key}".encode()


def test_bucket_admits_its_burst_then_says_when_the_next_token_arrives() -> None:
    bucket = TokenBucket(rate=2.0, capacity=3.0, now=0.0)
    for _ in range(3):
        assert bucket.wait(1.0, 0.0) == 0
        bucket.take(1.0)
    assert bucket.wait(1.0, 0.0) == pytest.approx(0.5)
    assert bucket.wait(1.0, 0.25) == pytest.approx(0.25)
    assert bucket.wait(1.0, 0.5) == 0


def test_job_larger_than_the_bucket_waits_for_a_full_one_and_leaves_it_in_debt() -> None:
    bucket = TokenBucket(rate=10.0, capacity=600.0, now=0.0)
    assert bucket.wait(1000.0, 0.0) == 0
    bucket.take(1000.0)
    # 400 units of debt, then a full bucket again: 100 s at 10 units/s for 1000 units.
    assert bucket.wait(1000.0, 0.0) == pytest.approx(100.0)


def test_quotas_refuse_without_taking_and_name_the_limit() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    tenant = Tenant("a", "default", 2, requests_per_s=1.0, burst=2, cost_per_minute=60.0)
    with quotas.admit(tenant, cost=30.0):
        pass
    with pytest.raises(OverLimit) as info, quotas.admit(tenant, cost=40.0):
        pass
    assert info.value.limit == "cost_per_minute"
    assert info.value.retry_after_s == pytest.approx(10.0)  # 10 units short at 1 unit/s
    with quotas.admit(tenant, cost=30.0):  # the refusal took no request token
        pass
    with pytest.raises(OverLimit) as info, quotas.admit(tenant, cost=0.0):
        pass
    assert (info.value.limit, info.value.retry_after) == ("requests_per_s", 1)


def test_concurrent_limit_is_held_for_the_request_and_given_back() -> None:
    quotas = Quotas(Clock())
    tenant = Tenant("a", "default", 2, max_concurrent=1)
    with quotas.admit(tenant, cost=1.0):
        with pytest.raises(OverLimit, match="max_concurrent"), quotas.admit(tenant, cost=1.0):
            pass
        assert quotas.active("a") == 1
    assert quotas.active("a") == 0


def test_replicas_divide_every_limit() -> None:
    quotas = Quotas(Clock())
    tenant = Tenant("a", "default", 2, requests_per_s=4.0, burst=4)
    for _ in range(2):
        with quotas.admit(tenant, 0.0, replicas=2):
            pass
    with pytest.raises(OverLimit), quotas.admit(tenant, 0.0, replicas=2):
        pass


def test_bucket_state_survives_new_limits() -> None:
    clock = Clock()
    quotas = Quotas(clock)
    with quotas.admit(Tenant("a", "default", 2, requests_per_s=1.0, burst=1), 0.0):
        pass
    reloaded = Tenant("a", "default", 2, requests_per_s=2.0, burst=5)
    with pytest.raises(OverLimit) as info, quotas.admit(reloaded, 0.0):
        pass
    assert info.value.retry_after_s == pytest.approx(0.5)


def test_keys_map_to_tenants_and_plain_keys_to_the_default_tenant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "b.key").write_text("key-b\n")
    monkeypatch.setenv("KEY_C", "key-c")
    path = tmp_path / "router.toml"
    path.write_text(
        f"""
[security]
admin_token = "root"
api_keys = ["plain"]
[[security.keys]]
tenant = "a"
key = "key-a"
priority_class = "interactive"
requests_per_s = 2.0
[[security.keys]]
tenant = "b"
key_file = "{tmp_path / "b.key"}"
priority_class = "bulk"
[[security.keys]]
tenant = "c"
key_env = "KEY_C"
"""
    )
    config = load_config(path)
    assert [k.key for k in config.security.keys] == ["key-a", "key-b", "key-c"]
    assert dump_config(config)["security"]["keys"][0]["key"] == MASK
    auth = Auth(config.security, config.tenants)
    found = {k: auth.inference_tenant(bearer(k)) for k in ("plain", "key-a", "key-b", "root")}
    assert {k: (t.name, t.priority_class) for k, t in found.items() if t} == {
        "plain": ("default", "default"),
        "key-a": ("a", "interactive"),
        "key-b": ("b", "bulk"),
        "root": ("admin", "system"),
    }
    assert auth.inference_tenant(bearer("key-c")).priority_class == "default"
    assert auth.inference_tenant(bearer("nope")) is None
    assert Auth(SecurityConfig(), TenantsConfig()).inference_tenant(None).name == "default"


def test_keys_config_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "router.toml"
    path.write_text(
        """
[[security.keys]]
tenant = "a"
key = "k1"
priority_class = "vip"
[[security.keys]]
tenant = "b"
key_env = "DSROUTER_TEST_UNSET_KEY"
[[security.keys]]
tenant = "c"
[[security.keys]]
tenant = "a"
key = "k1"
requests_per_s = 3.0
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert "security.keys[1].key_env: environment variable" in text
    assert "security.keys[2]: expected key, key_env or key_file" in text
    with pytest.raises(ConfigError) as info:
        load_config(_without_bad_sources(path))
    text = "\n".join(info.value.problems)
    assert "security.keys[0].priority_class: expected one of tenants.classes" in text
    assert "security.keys[3]: tenant 'a' has other limits" in text
    assert "security.keys[3]: this key is given twice" in text


def _without_bad_sources(path: Path) -> Path:
    text = path.read_text()
    text = text.replace('key_env = "DSROUTER_TEST_UNSET_KEY"', 'key = "k2"')
    text = text.replace('tenant = "c"\n', 'tenant = "c"\nkey = "k3"\n')
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("header", "rank", "priority"),
    [
        (None, 1, 0),
        (b"bulk", 3, 0),
        (b"system", 1, 0),  # never raised above the key's class
        (b"nonsense", 1, 0),
        (b"-2", 1, -2),
        (b"5", 1, 0),  # an integer may only lower
        (b"--5", 1, 0),
    ],
)
def test_priority_header_may_only_lower_the_keys_class(
    header: bytes | None, rank: int, priority: int
) -> None:
    tenant = Tenant("a", "interactive", 1)
    place = _queue_place(tenant, header, TenantsConfig(aging_s=7.0))
    assert (place.rank, place.priority, place.tenant, place.aging_s) == (rank, priority, "a", 7.0)


async def serve_in_order(
    registry: object, requests: list[tuple[str, float, QueuePlace]], count: int
) -> list[str]:
    """Queue `requests` (name, cost, place) behind one busy worker, then let the worker
    serve `count` of them one at a time; the names in the order they got the worker."""
    holder = await registry.acquire()
    order: list[str] = []
    done = trio.Event()

    async def wait(name: str, cost: float, place: QueuePlace) -> None:
        lease = await registry.acquire(cost=cost, place=place)
        order.append(name)
        if len(order) == count:
            done.set()
            return
        lease.release()

    async with trio.open_nursery() as nursery:
        for name, cost, place in requests:
            nursery.start_soon(wait, name, cost, place)
            await trio.testing.wait_all_tasks_blocked()
        holder.release()
        with trio.fail_after(5):
            await done.wait()
        nursery.cancel_scope.cancel()
    return order


async def test_higher_class_goes_first_and_fifo_within_a_tenant() -> None:
    registry = pool(1, max_inflight_per_worker=1)
    bulk, interactive = QueuePlace(rank=3, tenant="t"), QueuePlace(rank=1, tenant="t")
    order = await serve_in_order(
        registry,
        [("b1", 1, bulk), ("b2", 1, bulk), ("i1", 1, interactive), ("i2", 1, interactive)],
        4,
    )
    assert order == ["i1", "i2", "b1", "b2"]


async def test_waiting_raises_a_request_one_class_per_aging_period() -> None:
    clock = Clock()
    registry = pool(1, clock, max_inflight_per_worker=1)
    old_bulk = QueuePlace(rank=3, tenant="t", aging_s=10.0)
    order: list[str] = []
    holder = await registry.acquire()
    async with trio.open_nursery() as nursery:

        async def wait(name: str, place: QueuePlace) -> None:
            lease = await registry.acquire(place=place)
            order.append(name)
            lease.release()

        nursery.start_soon(wait, "old-bulk", old_bulk)
        await trio.testing.wait_all_tasks_blocked()
        clock.now = 25.0  # two periods: bulk (3) -> interactive (1)
        nursery.start_soon(wait, "new-default", QueuePlace(rank=2, tenant="u", aging_s=10.0))
        await trio.testing.wait_all_tasks_blocked()
        holder.release()
    assert order == ["old-bulk", "new-default"]


async def test_backlogged_tenants_get_equal_gpu_work_whatever_their_job_sizes() -> None:
    registry = pool(1, max_inflight_per_worker=1)
    requests = []
    for i in range(10):
        requests.append((f"big{i}", 40.0, QueuePlace(tenant="big")))
    for i in range(60):
        requests.append((f"small{i}", 10.0, QueuePlace(tenant="small")))
    order = await serve_in_order(registry, requests, 40)
    work = Counter()
    for name in order:
        work[name.rstrip("0123456789")] += 40.0 if name.startswith("big") else 10.0
    assert work["big"] == pytest.approx(work["small"], rel=0.1)


async def test_weight_sets_the_share() -> None:
    registry = pool(1, max_inflight_per_worker=1)
    requests = [(f"a{i}", 1.0, QueuePlace(tenant="a", weight=3.0)) for i in range(30)]
    requests += [(f"b{i}", 1.0, QueuePlace(tenant="b")) for i in range(30)]
    order = await serve_in_order(registry, requests, 20)
    assert Counter(name[0] for name in order) == {"a": 15, "b": 5}


def test_api_key_limits_are_what_a_tenants_keys_share() -> None:
    assert ApiKey("a", key="1").limits() == ApiKey("a", key="2").limits()
    assert ApiKey("a", burst=2).limits() != ApiKey("a").limits()
