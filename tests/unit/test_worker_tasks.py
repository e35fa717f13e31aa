"""One worker's background task never ends the router (issue 12, item 2).

Health probes, capability probes and weight catch-ups run per worker under the root
nursery. A host that slipped past `normalize_worker_url` (these tests register it straight
into the registry, as the code before the fix let `http://a..b:1` through) or a bug in one
of these tasks must end that task only, with an ERROR line naming the worker.
"""

import logging

import pytest
import trio

from dsrouter.config import Config, HealthConfig
from dsrouter.context import RouterContext
from dsrouter.control import PoolControl
from dsrouter.health import HealthChecker, probe_capabilities
from dsrouter.metrics import Metrics
from dsrouter.policies import LeastRequest
from dsrouter.registry import Capabilities, ProbeOutcome, Registry
from dsrouter.workers_http import WorkerHTTP

UNENCODABLE = ["http://a..b:1", "http://" + "a" * 64 + ".example:1", "http://\u00fc_.invalid:1"]
"""Hosts the resolver's IDNA step cannot encode: each raised UnicodeError out of a probe."""


def errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.parametrize("url", UNENCODABLE)
async def test_a_probe_of_a_host_that_cannot_be_encoded_is_a_failed_connect(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    reading = await WorkerHTTP(connect_timeout_s=1).probe(url, api_key="", timeout_s=5)
    assert reading.outcome is ProbeOutcome.REFUSED
    assert reading.detail is not None and "IDNA" in reading.detail
    assert any("cannot be IDNA-encoded" in line for line in errors(caplog))


@pytest.mark.parametrize("url", UNENCODABLE)
async def test_a_capability_probe_of_a_host_that_cannot_be_encoded_has_no_answer(
    url: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert await probe_capabilities(WorkerHTTP(connect_timeout_s=1), url, "", 5) is None
    assert any("cannot be IDNA-encoded" in line for line in errors(caplog))


async def test_a_probe_that_raises_counts_as_failed_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Broken(WorkerHTTP):
        async def probe(self, *args: object, **kwargs: object) -> object:
            raise RuntimeError("bug in the prober")

    registry = Registry(HealthConfig(), LeastRequest())
    worker, _ = registry.add("http://127.0.0.1:9")
    checker = HealthChecker(registry, Broken(connect_timeout_s=1), HealthConfig())
    await checker.probe_now(worker.url)
    assert worker.last_error is not None and "bug in the prober" in worker.last_error
    assert any("health probe of http://127.0.0.1:9" in line for line in errors(caplog))


async def test_a_failing_capability_probe_or_catch_up_ends_only_that_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry(HealthConfig(), LeastRequest())
    bad, good = "http://127.0.0.1:1", "http://127.0.0.1:2"
    registry.add(bad)
    registry.add(good)
    caught_up = trio.Event()

    async def prober(url: str) -> Capabilities | None:
        if url == bad:
            raise UnicodeError("label empty or too long")
        return Capabilities(model_id="m")

    async def catch_up(url: str) -> None:
        if url == bad:
            raise ValueError("a bug in the catch-up")
        caught_up.set()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(registry.run, prober, catch_up)
            await registry.request_capability_refresh(bad).wait()
            registry.request_catch_up(bad)
            await registry.request_capability_refresh(good).wait()
            registry.request_catch_up(good)
            await caught_up.wait()
            nursery.cancel_scope.cancel()
    assert registry.by_url(good).capabilities.model_id == "m"
    lines = errors(caplog)
    assert any("capability probe of worker " + bad in line for line in lines)
    assert any("weight catch-up of worker " + bad in line for line in lines)
    registry.request_catch_up(bad)  # the failed catch-up no longer blocks a new one
    assert registry._refresh_receive.receive_nowait() == ("catch-up", bad)


async def test_a_broadcast_to_a_host_that_cannot_be_encoded_reports_that_worker(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = Registry(HealthConfig(), LeastRequest())
    worker, _ = registry.add("http://\u00fc_.invalid:1")
    workers = WorkerHTTP(connect_timeout_s=1)
    health = HealthChecker(registry, workers, HealthConfig())
    context = RouterContext(Config(), registry, health, workers, Metrics(registry))
    [result] = await PoolControl(context).broadcast(
        [worker], "POST", "/release_memory_occupation", b"{}"
    )
    assert result["status_code"] == 502 and "IDNA" in result["body"]["error"]
    assert any("cannot be IDNA-encoded" in line for line in errors(caplog))
