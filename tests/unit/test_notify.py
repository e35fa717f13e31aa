"""The notify protocol's addressing and message shapes, against a real datagram socket."""

import os
import socket
import threading
from collections.abc import Iterator

import pytest
import trio

from dsrouter.notify import Notifier, describe_pool, socket_address


@pytest.fixture
def listener() -> Iterator[tuple[str, socket.socket]]:
    """What systemd listens on, in the abstract namespace (`@name`), read without blocking."""
    name = f"@dsrouter-unit-{os.getpid()}-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name[1:].encode())
        sock.setblocking(False)
        yield name, sock


def _drain(sock: socket.socket) -> list[bytes]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096))
        except BlockingIOError:
            return messages


def test_abstract_names_get_a_leading_nul_and_paths_stay_paths() -> None:
    assert socket_address("@dsrouter/notify") == b"\0dsrouter/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_messages_reach_an_abstract_socket(listener: tuple[str, socket.socket]) -> None:
    name, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})
    notifier.ready("2/2 workers healthy, 0 queued")
    notifier.status("2/2 workers healthy, 0 queued")
    notifier.status("1/2 workers healthy, 3 queued")
    notifier.stopping()
    notifier.status("0/2 workers healthy, 0 queued")
    assert _drain(sock) == [
        b"READY=1\nSTATUS=2/2 workers healthy, 0 queued",
        b"STATUS=1/2 workers healthy, 3 queued",
        b"STOPPING=1\nSTATUS=draining in-flight requests",
    ]


def test_reload_is_bracketed_by_reloading_and_ready_even_when_it_fails(
    listener: tuple[str, socket.socket],
) -> None:
    name, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})
    notifier.ready("1/1 workers healthy, 0 queued")
    _drain(sock)
    with pytest.raises(RuntimeError), notifier.reloading(lambda: "0/1 workers healthy, 0 queued"):
        raise RuntimeError("bad file")
    reloading, ready = _drain(sock)
    fields = dict(line.split("=", 1) for line in reloading.decode().splitlines())
    assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) > 0
    assert ready == b"READY=1\nSTATUS=0/1 workers healthy, 0 queued"


def test_a_reload_before_start_up_finished_does_not_announce_readiness(
    listener: tuple[str, socket.socket],
) -> None:
    name, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})
    with notifier.reloading(lambda: "0/0 workers healthy, 0 queued"):
        pass
    assert _drain(sock) == []


def test_a_reload_while_draining_does_not_announce_readiness_again(
    listener: tuple[str, socket.socket],
) -> None:
    name, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})
    notifier.ready("1/1 workers healthy, 0 queued")
    notifier.stopping()
    _drain(sock)
    with notifier.reloading(lambda: "1/1 workers healthy, 0 queued"):
        pass
    assert _drain(sock) == []


def test_without_notify_socket_nothing_is_sent_and_the_watchdog_is_off() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    notifier.ready("x")
    assert (
        Notifier(
            {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        ).watchdog_s
        is None
    )
    assert (
        Notifier(
            {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
        ).watchdog_s
        == 1.0
    )
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000"}).watchdog_s == 1.0
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "soon"}).watchdog_s is None


def test_an_unreachable_socket_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": f"@dsrouter-nobody-{os.getpid()}"})
    notifier.ready("x")
    notifier.send("WATCHDOG=1")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "dsrouter-nobody" in warnings[0].getMessage()


def test_a_full_socket_queue_drops_messages_instead_of_blocking(
    listener: tuple[str, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    """A blocked send would stall the event loop, and with it the watchdog pings."""
    name, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})
    sender = threading.Thread(
        target=lambda: [notifier.send("WATCHDOG=1") for _ in range(500)], daemon=True
    )
    sender.start()
    sender.join(timeout=10)
    assert not sender.is_alive()
    assert 0 < len(_drain(sock)) < 500
    assert any("Resource temporarily unavailable" in r.getMessage() for r in caplog.records)


async def test_watchdog_pings_at_half_the_interval(
    listener: tuple[str, socket.socket], autojump_clock: trio.testing.MockClock
) -> None:
    name, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": name, "WATCHDOG_USEC": "2000000"})
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run_watchdog)
        await trio.sleep(4.5)
        nursery.cancel_scope.cancel()
    assert _drain(sock) == [b"WATCHDOG=1"] * 5


async def test_watchdog_task_ends_at_once_without_a_watchdog(
    listener: tuple[str, socket.socket],
) -> None:
    name, sock = listener
    with trio.fail_after(1):
        await Notifier({"NOTIFY_SOCKET": name}).run_watchdog()
    assert _drain(sock) == []


async def test_status_is_resent_only_when_it_changes(
    listener: tuple[str, socket.socket], autojump_clock: trio.testing.MockClock
) -> None:
    name, sock = listener
    notifier = Notifier({"NOTIFY_SOCKET": name})
    queued = [0]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(notifier.run_status, lambda: f"1/1 workers healthy, {queued[0]} queued")
        await trio.sleep(3.5)
        queued[0] = 4
        await trio.sleep(3)
        nursery.cancel_scope.cancel()
    assert _drain(sock) == [
        b"STATUS=1/1 workers healthy, 0 queued",
        b"STATUS=1/1 workers healthy, 4 queued",
    ]


def test_status_line_names_what_is_unusual() -> None:
    summary = {
        "healthy_workers": 6,
        "total_workers": 8,
        "queued": 0,
        "sleeping_workers": 0,
        "stale_workers": 2,
        "draining_workers": 0,
    }
    assert describe_pool(summary) == "6/8 workers healthy, 0 queued, 2 stale"
