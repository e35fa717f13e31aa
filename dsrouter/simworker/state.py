"""What one simulated worker remembers, and its one-at-a-time scheduler.

A real worker runs generations and control operations (weights, LoRA, sleep) through one
FIFO queue per GPU group; the router's fairness, draining and refit logic all depend on that,
so the simulator keeps the same single queue (a fair `trio.Lock`) and the same sleep
semantics: `/health` stays 200 while asleep and generations fail.
"""

from __future__ import annotations

import hashlib
import math
import random
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from dsrouter.simworker.asgi import SLEEPING
from dsrouter.simworker.options import SimOptions

MAX_IMAGES = 512
LOG_LIMIT = 1000
"""Realtime message digests remembered per direction (the first ones of a session)."""
FAULT_FIELDS = {
    "fail_rate": float,
    "hang_rate": float,
    "unavailable_rate": float,
    "exit_after": int,
    "slow_body_bps": int,
    "backend_failed": str,
    "refit_fails": bool,
    "corrupt_weights": bool,
    "slowdown": float,
}


def _valid(kind: type, value: Any) -> bool:
    if value is None or kind is bool:
        return value is None or isinstance(value, bool)
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


class GenerationFailed(Exception):
    """The scheduler failed a generation; the message is its error text."""


class Asleep(GenerationFailed):
    """Generation refused: the worker released its GPU memory."""

    def __init__(self) -> None:
        super().__init__(SLEEPING)


@attrs.define
class RealtimeLog:
    """What the last session carried, for tests to compare with what they sent and got."""

    sessions: int = 0
    received: list[str] = attrs.Factory(list)
    sent: list[str] = attrs.Factory(list)
    client_close: tuple[int, str] | None = None

    def note(self, digests: list[str], data: bytes) -> None:
        if len(digests) < LOG_LIMIT:
            digests.append(hashlib.sha256(data).hexdigest())

    def start(self) -> None:
        self.sessions += 1
        self.received, self.sent, self.client_close = [], [], None

    def to_json(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "received_sha256": self.received,
            "sent_sha256": self.sent,
            "client_close": list(self.client_close) if self.client_close else None,
        }


@attrs.define
class LiveFaults:
    fail_rate: float = 0.0
    hang_rate: float = 0.0
    unavailable_rate: float = 0.0
    """Fraction of POSTs answered 503 `{"error": ...}` while `/health` stays 200: what a
    worker behind an overloaded ingress looks like to the router."""
    exit_after: int | None = None
    slow_body_bps: int = 0
    backend_failed: str | None = None
    refit_fails: bool = False
    corrupt_weights: bool = False
    slowdown: float = 1.0
    """Service times are multiplied by this: a GPU that throttles or is shared mid-run."""

    def update(self, changes: dict[str, Any]) -> list[str]:
        """Apply `changes`; returns the problems instead when any field is wrong."""
        problems = []
        for key, value in changes.items():
            kind = FAULT_FIELDS.get(key)
            if kind is None:
                problems.append(f"unknown fault {key!r}; known: {', '.join(FAULT_FIELDS)}")
            elif not _valid(kind, value):
                problems.append(f"{key}: expected {kind.__name__} or null, got {value!r}")
            elif key.endswith("_rate") and value is not None and not 0 <= value <= 1:
                problems.append(f"{key}: expected a fraction between 0 and 1")
            elif key == "slowdown" and value is not None and not 0 < value < math.inf:
                problems.append(f"{key}: expected a factor > 0")
        if not problems:
            for key, value in changes.items():
                if (key.endswith("_rate") or key == "slow_body_bps") and value is None:
                    value = 0
                if key in ("refit_fails", "corrupt_weights") and value is None:
                    value = False
                if key == "slowdown" and value is None:
                    value = 1.0
                setattr(self, key, value)
        return problems


@attrs.define(eq=False)
class Job:
    """A video or mesh job, kept in worker memory until DELETE, as on a real worker."""

    record: dict[str, Any]
    seq: int
    size: int
    seed: int
    variants: int = 1


@attrs.define(eq=False)
class SimWorker:
    options: SimOptions
    port: int
    nursery: trio.Nursery
    faults: LiveFaults
    rng: random.Random
    warm: trio.Event = attrs.Factory(trio.Event)
    scheduler: trio.Lock = attrs.Factory(trio.Lock)
    queued: int = 0
    running: int = 0
    in_flight: int = 0
    requests_total: int = 0
    sleeping: bool = False
    model_path: str = ""
    weight_updates: int = 0
    loras: dict[str, dict[str, Any]] = attrs.Factory(dict)
    images: OrderedDict[str, tuple[str, list[bytes]]] = attrs.Factory(OrderedDict)
    videos: dict[str, Job] = attrs.Factory(dict)
    meshes: dict[str, Job] = attrs.Factory(dict)
    job_seq: int = 0
    realtime_active: bool = False
    """A realtime WebSocket session runs (one at a time, as on a real worker)."""
    realtime_freed: trio.Event = attrs.Factory(trio.Event)
    realtime: RealtimeLog = attrs.Factory(RealtimeLog)
    trace_headers: deque[dict[str, str | None]] = attrs.Factory(lambda: deque(maxlen=64))
    """The W3C trace headers of the last requests (`GET /_sim/traces`), so tests can see
    what a router propagated; a real worker only passes them to its own tracing."""

    @classmethod
    def create(cls, options: SimOptions, port: int, nursery: trio.Nursery) -> SimWorker:
        f = options.faults
        return cls(
            options=options,
            port=port,
            nursery=nursery,
            faults=LiveFaults(
                fail_rate=f.fail_rate,
                hang_rate=f.hang_rate,
                exit_after=f.exit_after,
                slow_body_bps=f.slow_body_bps,
            ),
            rng=random.Random(options.seed * 65537 + port),
            model_path=options.model_path,
        )

    @property
    def weight_version(self) -> str:
        """What the GPU processes hold: the loaded path plus how many updates led there."""
        return f"{self.model_path}#{self.weight_updates}"

    def service_seconds(self, units: float) -> float:
        return self.options.sec_per_mpx_step * units / self.options.speed * self.faults.slowdown

    @asynccontextmanager
    async def scheduled(self) -> AsyncIterator[None]:
        """Hold the worker's single FIFO queue (generations and control operations alike)."""
        self.queued += 1
        waiting = True
        try:
            async with self.scheduler:
                self.queued -= 1
                waiting = False
                self.running += 1
                try:
                    yield
                finally:
                    self.running -= 1
        finally:
            if waiting:
                self.queued -= 1

    async def generate(self, units: float, fails: str | None = None) -> float:
        """Run one generation of `units` megapixel-steps; returns its inference time.

        `fails`: the model's error, raised as `GenerationFailed` once the generation has
        its turn in the queue (where a real model would raise)."""
        async with self.scheduled():
            if self.sleeping:
                raise Asleep
            if fails is not None:
                raise GenerationFailed(fails)
            seconds = self.service_seconds(units)
            await trio.sleep(seconds)
            return seconds

    def roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def new_id(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def store_images(self, image_id: str, fmt: str, images: list[bytes]) -> None:
        """Bounded, unlike a real worker's never-evicted map: a simulator must not grow."""
        self.images[image_id] = (fmt, images)
        while len(self.images) > MAX_IMAGES:
            self.images.popitem(last=False)

    def add_job(
        self, store: dict[str, Job], record: dict[str, Any], size: int, variants: int
    ) -> Job:
        self.job_seq += 1
        job = Job(
            record=record,
            seq=self.job_seq,
            size=size,
            seed=int(hashlib.sha256(record["id"].encode()).hexdigest()[:8], 16),
            variants=variants,
        )
        store[record["id"]] = job
        return job

    def checksums(self, modules: list[str] | None) -> dict[str, str]:
        names = ["transformer", "vae", "text_encoder"]
        salt = "corrupt" if self.faults.corrupt_weights else ""
        lora = ",".join(sorted(n for n, a in self.loras.items() if a.get("active")))
        return {
            name: (
                hashlib.sha256(f"{self.model_path}|{name}|{lora}|{salt}".encode()).hexdigest()
                if name in names
                else "not_found"
            )
            for name in (modules or names)
        }

    def state(self) -> dict[str, Any]:
        return {
            "port": self.port,
            "in_flight": self.in_flight,
            "queued": self.queued,
            "running": self.running,
            "requests_total": self.requests_total,
            "sleeping": self.sleeping,
            "warm": self.warm.is_set(),
            "model_path": self.model_path,
            "weight_version": self.weight_version,
            "weight_updates": self.weight_updates,
            "loras": self.loras,
            "videos": len(self.videos),
            "meshes": len(self.meshes),
            "images": len(self.images),
            "faults": attrs.asdict(self.faults),
            "realtime": self.realtime.to_json(),
        }


def now() -> int:
    return int(time.time())
