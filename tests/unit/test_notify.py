"""The notify protocol's addressing and message shapes, against a real datagram socket."""

import os
import socket

from dsrouter.notify import Notifier, describe_pool, socket_address


def test_abstract_names_get_a_leading_nul_and_paths_stay_paths() -> None:
    assert socket_address("@dsrouter/notify") == b"\0dsrouter/notify"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


def test_messages_reach_an_abstract_socket() -> None:
    name = f"@dsrouter-unit-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(b"\0" + name[1:].encode())
        notifier = Notifier({"NOTIFY_SOCKET": name})
        notifier.ready("2/2 workers healthy, 0 queued")
        assert listener.recv(4096) == b"READY=1\nSTATUS=2/2 workers healthy, 0 queued"
        notifier.status("2/2 workers healthy, 0 queued")
        notifier.status("1/2 workers healthy, 3 queued")
        assert listener.recv(4096) == b"STATUS=1/2 workers healthy, 3 queued"


def test_without_notify_socket_nothing_is_sent_and_the_watchdog_is_off() -> None:
    notifier = Notifier({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    notifier.ready("x")
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000",
                     "WATCHDOG_PID": "1"}).watchdog_s is None
    assert Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000"}).watchdog_s == 1.0


def test_status_line_names_what_is_unusual() -> None:
    summary = {"healthy_workers": 6, "total_workers": 8, "queued": 0, "sleeping_workers": 0,
               "stale_workers": 2, "draining_workers": 0}
    assert describe_pool(summary) == "6/8 workers healthy, 0 queued, 2 stale"
