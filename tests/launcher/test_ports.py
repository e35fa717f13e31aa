"""The port plan and the reservation check (real sockets on 127.0.0.1)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from dsrouter.config import LauncherConfig
from dsrouter.launcher.errors import LaunchError
from dsrouter.launcher.ports import WorkerPorts, check_ports_free, plan_ports, scan_free_ports
from tests.launcher.helpers import free_port_block


def _config(**changes: object) -> LauncherConfig:
    return LauncherConfig(  # type: ignore[arg-type]
        **{"model": "m", "num_workers": 3, "internal_port_stride": 1, **changes}
    )


@contextmanager
def _listening(port: int, host: str = "127.0.0.1") -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind((host, port))
        sock.listen()
        yield sock


def test_workers_get_stride_apart_http_ports_and_consecutive_internal_ports() -> None:
    plan = plan_ports(
        _config(
            worker_base_port=20000,
            port_stride=4,
            master_port_base=31000,
            scheduler_port_base=32000,
            internal_port_stride=3,
        )
    )
    assert plan == [
        WorkerPorts(20000, 31000, 32000),
        WorkerPorts(20004, 31003, 32003),
        WorkerPorts(20008, 31006, 32006),
    ]
    assert [p.broker for p in plan] == [20001, 20005, 20009]


def test_stride_of_one_is_refused_because_port_plus_one_is_the_broker() -> None:
    with pytest.raises(LaunchError, match="port_stride is 1, it must be at least 2"):
        plan_ports(_config(port_stride=1))


def test_one_worker_may_use_stride_one() -> None:
    assert plan_ports(_config(num_workers=1, port_stride=1))[0].http == 10090


def test_internal_ports_overlapping_http_ports_are_refused_with_both_owners_named() -> None:
    with pytest.raises(LaunchError) as caught:
        plan_ports(_config(worker_base_port=20000, master_port_base=20003))
    message = str(caught.value)
    assert "overlaps itself" in message
    assert "worker 0 master port 20003 is also worker 1 broker port (HTTP port + 1)" in message


def test_ports_beyond_65535_are_refused() -> None:
    with pytest.raises(LaunchError, match="worker 2 HTTP port would be 65539"):
        plan_ports(_config(worker_base_port=65535, master_port_base=1000, scheduler_port_base=2000))


def test_free_ports_pass_the_check() -> None:
    base = free_port_block(12)
    plan = plan_ports(
        _config(worker_base_port=base, master_port_base=base + 6, scheduler_port_base=base + 9)
    )
    check_ports_free(plan, "127.0.0.1")


def test_a_busy_http_port_is_refused_naming_the_worker_and_port() -> None:
    base = free_port_block(12)
    plan = plan_ports(
        _config(worker_base_port=base, master_port_base=base + 6, scheduler_port_base=base + 9)
    )
    with _listening(base + 2), pytest.raises(LaunchError) as caught:
        check_ports_free(plan, "127.0.0.1")
    assert f"worker 1 HTTP port 127.0.0.1:{base + 2}: already in use" in str(caught.value)


def test_a_busy_broker_port_is_refused_too() -> None:
    base = free_port_block(12)
    plan = plan_ports(
        _config(worker_base_port=base, master_port_base=base + 6, scheduler_port_base=base + 9)
    )
    with _listening(base + 5), pytest.raises(LaunchError) as caught:
        check_ports_free(plan, "127.0.0.1")
    assert f"worker 2 broker port (HTTP port + 1) 127.0.0.1:{base + 5}" in str(caught.value)


def test_a_port_held_on_the_wildcard_address_blocks_a_loopback_worker() -> None:
    base = free_port_block(12)
    plan = plan_ports(
        _config(worker_base_port=base, master_port_base=base + 6, scheduler_port_base=base + 9)
    )
    with _listening(base + 7, host="0.0.0.0"), pytest.raises(LaunchError) as caught:
        check_ports_free(plan, "127.0.0.1")
    assert f"worker 1 master port 127.0.0.1:{base + 7}: already in use" in str(caught.value)


def test_a_host_this_machine_does_not_have_is_refused() -> None:
    plan = plan_ports(_config(num_workers=1, worker_base_port=free_port_block(4)))
    with pytest.raises(LaunchError, match=r"HTTP port 192\.0\.2\.1:"):
        check_ports_free(plan, "192.0.2.1")


def test_internal_ports_default_to_sglang_d_routers_stride_of_1000() -> None:
    plan = plan_ports(LauncherConfig(model="m", num_workers=2))  # type: ignore[arg-type]
    assert [(p.master, p.scheduler) for p in plan] == [(30005, 5555), (31005, 6555)]


def test_dp_replicas_take_consecutive_scheduler_ports_and_a_short_stride_is_refused() -> None:
    """`--dp-size 4` binds four scheduler ports per worker: with the stride below that, two
    workers would collide under --strict-ports, so the plan refuses before anything runs."""
    roomy = plan_ports(_config(num_workers=2, internal_port_stride=4, extra_args=["--dp-size=4"]))
    assert [port for label, port in roomy[1].labelled() if "scheduler" in label] == [
        5559,
        5560,
        5561,
        5562,
    ]
    with pytest.raises(LaunchError) as caught:
        plan_ports(_config(num_workers=2, internal_port_stride=2, extra_args=["--dp-size", "4"]))
    message = str(caught.value)
    assert "worker 1 scheduler port 5557 is also worker 0 scheduler port of dp replica 2" in message
    assert "--dp-size N takes N consecutive scheduler ports" in message


def test_a_busy_planned_port_is_named_and_the_scan_option_offered() -> None:
    base = free_port_block(12)
    plan = plan_ports(
        _config(worker_base_port=base, master_port_base=base + 6, scheduler_port_base=base + 9)
    )
    with _listening(base + 2), pytest.raises(LaunchError) as caught:
        check_ports_free(plan, "127.0.0.1")
    assert f"worker 1 HTTP port 127.0.0.1:{base + 2}: already in use" in str(caught.value)
    assert "launcher.scan_ports = true" in str(caught.value)


def test_scanning_moves_a_busy_http_port_past_every_planned_port_as_sglang_d_router_did() -> None:
    """Worker 0's HTTP port is busy: it moves to the next free pair that no other worker
    was given (worker 1 keeps its planned ports), and the whole plan can then be bound."""
    base = free_port_block(16)
    plan = plan_ports(
        _config(
            num_workers=2,
            worker_base_port=base,
            master_port_base=base + 8,
            scheduler_port_base=base + 10,
        )
    )
    with _listening(base):
        moved = scan_free_ports(plan, "127.0.0.1")
        check_ports_free(moved, "127.0.0.1")
    assert moved[0].http == base + 4  # base + 1 is its own broker, + 2 and + 3 are worker 1's
    assert moved[1:] == plan[1:] and moved[0].master == plan[0].master
