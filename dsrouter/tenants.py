"""Tenants: who a request is for, its priority class, and the tenant's limits.

`Auth` maps each API key to a `Tenant` (`[[security.keys]]`; the plain `api_keys`, the
admin token and an open router map to fixed ones). The proxy asks `Quotas.admit` before a
generation request joins the router queue: over a limit it gets 429 with a Retry-After the
bucket computes. `Quotas` is the only owner of the limit state (token buckets, concurrent
requests), kept by tenant name, so it survives a reload; only its synchronous methods change
it. The queue order by class and fair share lives in `registry/dispatch.py`.

Several router replicas: each enforces `1/tenants.replicas` of every limit on its own. That
is exact when the load balancer spreads a tenant's requests evenly, and off by the imbalance
otherwise (a tenant whose requests all land on one replica gets 1/replicas of its limit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import attrs

from dsrouter.config import ApiKey, TenantsConfig

DEFAULT_TENANT = "default"
"""The tenant of the plain `api_keys` and of every request to a router without keys."""
ADMIN_TENANT = "admin"
"""The tenant of the admin token on inference routes: the highest class, no limits."""


@attrs.frozen
class Tenant:
    """A tenant as the current configuration describes it (rebuilt on reload)."""

    name: str
    priority_class: str
    rank: int
    """Index of the class in `tenants.classes`: 0 is served first."""
    weight: float = 1.0
    requests_per_s: float = 0.0
    burst: int = 0
    max_concurrent: int = 0
    cost_per_minute: float = 0.0

    @classmethod
    def from_key(cls, entry: ApiKey, tenants: TenantsConfig) -> Tenant:
        name = entry.priority_class or tenants.default_class
        return cls(
            entry.tenant,
            name,
            tenants.classes.index(name),
            entry.weight,
            entry.requests_per_s,
            entry.burst,
            entry.max_concurrent,
            entry.cost_per_minute,
        )

    @classmethod
    def builtin(cls, name: str, tenants: TenantsConfig) -> Tenant:
        """The default tenant (default class) or the admin (the highest class), unlimited."""
        cls_name = tenants.classes[0] if name == ADMIN_TENANT else tenants.default_class
        return cls(name, cls_name, tenants.classes.index(cls_name))


class TokenBucket:
    """`rate` tokens a second up to `capacity`, starting full.

    A request takes `amount` tokens once the bucket holds `min(amount, capacity)`: one
    larger than the bucket (a huge job under a per-minute GPU budget) waits for a full
    bucket and leaves it in debt, so the long-run rate is exact whatever the sizes.
    """

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def set_limits(self, rate: float, capacity: float) -> None:
        """New limits (a reload): the tokens held stay, clipped to the new capacity."""
        self.rate = rate
        self.capacity = capacity
        self.tokens = min(self.tokens, capacity)

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` may be taken (0: now). Changes nothing but the refill."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        missing = min(amount, self.capacity) - self.tokens
        return max(0.0, missing / self.rate)

    def take(self, amount: float) -> None:
        self.tokens -= amount


class OverLimit(Exception):
    """A tenant is over one of its limits: 429 with `retry_after_s`."""

    def __init__(self, tenant: str, limit: str, value: float, retry_after_s: float) -> None:
        super().__init__(f"tenant {tenant!r} is over its {limit} limit ({value:g})")
        self.tenant = tenant
        self.limit = limit
        self.retry_after_s = retry_after_s

    @property
    def retry_after(self) -> int:
        """Whole seconds for the header: rounded up, so a client that obeys it gets in."""
        return max(1, math.ceil(self.retry_after_s))


@attrs.define
class _State:
    requests: TokenBucket | None = None
    cost: TokenBucket | None = None
    active: int = 0


class Quotas:
    """Per-tenant limit state: request and GPU-work buckets and concurrent requests."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._states: dict[str, _State] = {}

    def active(self, tenant: str) -> int:
        state = self._states.get(tenant)
        return state.active if state else 0

    @contextmanager
    def admit(self, tenant: Tenant, cost: float, replicas: int = 1) -> Iterator[None]:
        """Hold one of the tenant's concurrent requests for the `with` body, having taken
        one request and `cost` units from its buckets; raise `OverLimit` instead (taking
        nothing) when any limit is reached. Each limit is divided by `replicas`."""
        now = self._clock()
        state = self._states.setdefault(tenant.name, _State())
        state.requests = _bucket(
            state.requests, tenant.requests_per_s / replicas, tenant.burst / replicas, now
        )
        state.cost = _bucket(
            state.cost,
            tenant.cost_per_minute / 60 / replicas,
            tenant.cost_per_minute / replicas,
            now,
        )
        concurrent = math.ceil(tenant.max_concurrent / replicas)
        if concurrent and state.active >= concurrent:
            raise OverLimit(tenant.name, "max_concurrent", concurrent, 1.0)
        for limit, bucket, amount, value in (
            ("requests_per_s", state.requests, 1.0, tenant.requests_per_s / replicas),
            ("cost_per_minute", state.cost, cost, tenant.cost_per_minute / replicas),
        ):
            if bucket is not None and (wait := bucket.wait(amount, now)) > 0:
                raise OverLimit(tenant.name, limit, value, wait)
        if state.requests is not None:
            state.requests.take(1.0)
        if state.cost is not None:
            state.cost.take(cost)
        state.active += 1
        try:
            yield
        finally:
            state.active -= 1


def _bucket(
    bucket: TokenBucket | None, rate: float, capacity: float, now: float
) -> TokenBucket | None:
    """The bucket for a limit as configured now: kept across reloads, dropped when the
    limit is (0 = none). A bucket smaller than one request would never admit one."""
    if rate <= 0:
        return None
    capacity = max(capacity or rate, 1.0)
    if bucket is None:
        return TokenBucket(rate, capacity, now)
    bucket.set_limits(rate, capacity)
    return bucket
