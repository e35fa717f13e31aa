"""`dsrouter status` output, formatted from canned /workers and /health answers."""

from typing import Any

from dsrouter.client import BroadcastResult, PoolHealth, RefitResult, WorkerInfo
from dsrouter.ctl import (
    format_broadcast,
    format_queued,
    format_status,
    format_table,
    pool_version,
)


def _worker(port: int, **fields: Any) -> dict[str, Any]:
    url = f"http://10.0.0.{port % 10}:{port}"
    return {
        "worker_id": url.replace(":", "%3A").replace("/", "%2F"),
        "display_id": url.removeprefix("http://"),
        "url": url,
        "state": "healthy",
        "active_requests": 0,
        "is_dead": False,
        "is_sleeping": False,
        "is_draining": False,
        "is_stale": False,
        "weight_version": None,
        "consecutive_failures": 0,
        "video_support": False,
        "seconds_per_unit": None,
        "last_error": None,
        **fields,
    }


WORKERS = {
    "workers": [
        _worker(
            30001,
            active_requests=12,
            weight_version="step-7",
            seconds_per_unit=0.0123,
            video_support=True,
        ),
        _worker(
            30002, state="draining", is_draining=True, active_requests=3, weight_version="step-7"
        ),
        _worker(
            30003,
            state="stale",
            is_stale=True,
            consecutive_failures=4,
            weight_version="step-6",
            video_support=None,
            last_error="refit failed: 400: no such checkpoint",
        ),
    ],
    "queued": 5,
}
HEALTH = {
    "status": "healthy",
    "healthy_workers": 1,
    "total_workers": 3,
    "dead_workers": 0,
    "sleeping_workers": 0,
    "draining_workers": 1,
    "starting_workers": 0,
    "in_flight": 15,
    "queued": 5,
    "stale_workers": 1,
}


def _parse(workers: dict[str, Any]) -> list[WorkerInfo]:
    return [WorkerInfo.from_json(w) for w in workers["workers"]]


def test_table_has_one_aligned_row_per_worker_with_every_column() -> None:
    lines = format_table(_parse(WORKERS)).splitlines()
    assert lines[0].split() == [
        "WORKER",
        "STATE",
        "IN-FLIGHT",
        "FAILURES",
        "S/MPX-STEP",
        "WEIGHTS",
        "VIDEO",
    ]
    rows = [line.split() for line in lines[1:]]
    assert rows == [
        ["http://10.0.0.1:30001", "healthy", "12", "0", "0.0123", "step-7", "yes"],
        ["http://10.0.0.2:30002", "draining", "3", "0", "-", "step-7", "no"],
        ["http://10.0.0.3:30003", "stale", "0", "4", "-", "step-6", "?"],
    ]
    # Columns start at the same offset on every line; numbers are right-aligned under
    # their header.
    state_at = lines[0].index("STATE")
    assert all(line[state_at - 2 : state_at] == "  " for line in lines)
    in_flight_end = lines[0].index("IN-FLIGHT") + len("IN-FLIGHT")
    assert lines[1][in_flight_end - 2 : in_flight_end] == "12"
    assert lines[2][in_flight_end - 1] == "3"


def test_header_summarises_health_queue_weights_and_sleep() -> None:
    text = format_status("http://router:30080", PoolHealth.from_json(HEALTH), _parse(WORKERS))
    header = text.splitlines()[0]
    assert header == (
        "router http://router:30080: healthy, 1/3 workers routable, "
        "1 draining, 1 stale, 5 queued, 15 in flight, weights step-7, awake"
    )
    assert "http://10.0.0.3:30003: refit failed: 400: no such checkpoint" in text


def test_header_reports_a_sleeping_pool_and_launch_weights() -> None:
    asleep = {
        "status": "unhealthy",
        "healthy_workers": 0,
        "total_workers": 2,
        "dead_workers": 0,
        "sleeping_workers": 2,
        "queued": 0,
        "in_flight": 0,
    }
    workers = {
        "workers": [
            _worker(1, state="sleeping", is_sleeping=True),
            _worker(2, state="sleeping", is_sleeping=True),
        ]
    }
    header = format_status("u", PoolHealth.from_json(asleep), _parse(workers)).splitlines()[0]
    assert header.startswith("router u: unhealthy, 0/2 workers routable,")
    assert header.endswith("weights as-launched, asleep")


def test_empty_pool_and_partial_sleep() -> None:
    health = PoolHealth.from_json({"status": "unhealthy"})
    assert format_status("u", health, []).splitlines()[1] == "no workers registered"
    partly = PoolHealth.from_json(
        {"status": "healthy", "healthy_workers": 1, "total_workers": 3, "sleeping_workers": 2}
    )
    assert "partly asleep (2/3)" in format_status("u", partly, [])


def test_pool_version_ignores_stale_workers_and_flags_a_mix() -> None:
    parsed = _parse(WORKERS)
    assert pool_version(parsed) == "step-7"
    mixed = [*parsed, WorkerInfo.from_json(_worker(4, weight_version="step-8"))]
    assert pool_version(mixed) == "mixed (step-7, step-8)"
    assert pool_version([parsed[2]]) == "unknown"


def test_miles_shaped_workers_still_format() -> None:
    miles = {"url": "http://h:1", "active_requests": 2, "is_dead": True, "consecutive_failures": 3}
    row = format_table([WorkerInfo.from_json(miles)]).splitlines()[1].split()
    assert row == ["http://h:1", "dead", "2", "3", "-", "as-launched", "?"]


def test_status_counts_launched_workers_that_are_not_registered() -> None:
    """A pool of 2 launched workers, one restarting: 1/2 routable, not 1/1."""
    health = PoolHealth.from_json({"status": "healthy", "healthy_workers": 1, "total_workers": 1})
    slots = [
        {"index": 0, "state": "ready", "registered": True},
        {"index": 1, "state": "backoff", "registered": False},
    ]
    header = format_status("u", health, _parse({"workers": [_worker(1)]}), slots).splitlines()[0]
    assert header.startswith("router u: healthy, 1/2 workers routable, 1 restarting,")


def test_the_table_explains_its_speed_and_weights_columns() -> None:
    text = format_status("u", PoolHealth.from_json(HEALTH), _parse(WORKERS))
    assert "S/MPX-STEP: seconds the worker takes per megapixel per denoising step" in text
    assert "'as-launched' before any" in text


def test_broadcast_lines_name_each_worker_and_why_it_failed() -> None:
    result = BroadcastResult.from_json(
        {
            "results": [
                {"worker_url": "http://a:1", "status_code": 200, "body": {"success": True}},
                {
                    "worker_url": "http://b:1",
                    "status_code": 500,
                    "body": {"success": False, "message": "FSDP inference is not supported"},
                },
                {
                    "worker_url": "http://c:1",
                    "status_code": None,
                    "body": None,
                    "error": "Worker request failed: ConnectError: refused",
                },
            ]
        }
    )
    assert not result.ok
    assert format_broadcast(result, "asleep").splitlines() == [
        "http://a:1: asleep",
        "http://b:1: failed: 500: FSDP inference is not supported",
        "http://c:1: failed: Worker request failed: ConnectError: refused",
    ]
    quiet = BroadcastResult.from_json({"results": [], "message": "No sleeping workers"})
    assert quiet.ok and format_broadcast(quiet, "awake") == "No sleeping workers"


def test_refit_result_counts_a_success_false_body_and_stale_workers_as_failed() -> None:
    result = RefitResult.from_json(
        {
            "results": [
                {"worker_url": "http://a:1", "status_code": 200, "body": {"success": True}},
                {
                    "worker_url": "http://b:1",
                    "status_code": 200,
                    "body": {"success": False, "message": "bad shard"},
                },
            ],
            "success": False,
            "version": "v2",
            "stale_workers": ["http://b:1", "http://c:1"],
        }
    )
    assert result.failed == {
        "http://b:1": "200: bad shard",
        "http://c:1": "stale: not on the pool's weight version",
    }


def test_queue_per_tenant_longest_first() -> None:
    assert format_queued({}) == ""
    assert format_queued({"web": 1, "batch": 4, "admin": 1}) == (
        "queued by tenant: batch 4, admin 1, web 1"
    )
