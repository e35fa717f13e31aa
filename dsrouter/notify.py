"""The systemd notify protocol, spoken directly (no libsystemd).

With `Type=notify` systemd waits for `READY=1` before it considers the service started, shows
the last `STATUS=` line in `systemctl status`, restarts the service when `WATCHDOG=1` pings
stop (an event loop that stalled cannot ping), and logs `STOPPING=1` / `RELOADING=1`.
Each message is one datagram to the AF_UNIX socket named by `$NOTIFY_SOCKET`; a name starting
with `@` is in the abstract namespace (a leading NUL byte). Without `$NOTIFY_SOCKET` (not
under systemd) every method does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import trio

log = logging.getLogger("dsrouter.notify")

STATUS_POLL_S = 1.0
"""How often the STATUS line is recomputed; it is only sent when its text changed."""


def socket_address(name: str) -> str | bytes:
    """`$NOTIFY_SOCKET` as an AF_UNIX address: `@name` is abstract, the rest a path."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """Sends notify messages; a no-op when the service manager did not ask for them.

    Sending is synchronous and never blocks: a datagram to a local socket either fits in
    the receiver's queue at once or is dropped with a log line, so a busy service manager
    cannot stall the event loop (which would then miss its own watchdog pings).
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET", "")
        self.name = name
        self.address = socket_address(name) if name else None
        self.watchdog_s = watchdog_interval(env)
        self.last_status = ""
        self.is_ready = False
        self.is_stopping = False
        self._warned = False

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        """One datagram; failures are logged (the first one loudly), never raised."""
        if self.address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            try:
                sock.sendto("\n".join(fields).encode(), self.address)
            except OSError as exc:
                level = logging.DEBUG if self._warned else logging.WARNING
                self._warned = True
                log.log(level, "cannot notify the service manager at %s: %s", self.name, exc)

    def ready(self, status: str) -> None:
        """Start-up (or a reload) is complete; systemd now counts the service as running."""
        self.is_ready = True
        self.last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """Show `status` in `systemctl status` (sent only when it differs from the last);
        once stopping, the "draining" line stays."""
        if status != self.last_status and not self.is_stopping:
            self.last_status = status
            self.send(f"STATUS={status}")

    def stopping(self) -> None:
        """Shutdown began: systemd shows `deactivating` instead of suspecting a crash."""
        self.is_stopping = True
        self.send("STOPPING=1", "STATUS=draining in-flight requests")

    @contextmanager
    def reloading(self, describe: Callable[[], str]) -> Iterator[None]:
        """`RELOADING=1` before the block, `READY=1` (with a fresh STATUS) after it.

        Only between `ready()` and `stopping()`: a SIGHUP during start-up must not make
        systemd believe start-up is complete, nor one while draining that we are back.
        systemd (>= 253) wants the monotonic time with `RELOADING=1`.
        """
        if not self.is_ready or self.is_stopping:
            yield
            return
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")
        try:
            yield
        finally:
            self.ready(describe())

    async def run_watchdog(self) -> None:
        """Ping at half the watchdog interval for as long as the event loop keeps running.

        The pings come from an ordinary trio task on purpose: if anything blocks the loop,
        they stop, and systemd (`WatchdogSec=`) kills and restarts the router.
        """
        if not self.enabled or not self.watchdog_s:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog_s / 2)

    async def run_status(self, describe: Callable[[], str]) -> None:
        """Keep the STATUS line current: recomputed every second, sent when it changes."""
        if not self.enabled:
            return
        while True:
            self.status(describe())
            await trio.sleep(STATUS_POLL_S)


def watchdog_interval(env: Mapping[str, str]) -> float | None:
    """`$WATCHDOG_USEC` in seconds, if it is meant for this process (`$WATCHDOG_PID` unset
    or ours: a child that inherited the environment must not ping for its parent)."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def describe_pool(summary: Mapping[str, int]) -> str:
    """`6/8 workers healthy, 0 queued` (plus what is unusual) for `systemctl status`."""
    text = (
        f"{summary['healthy_workers']}/{summary['total_workers']} workers healthy, "
        f"{summary['queued']} queued"
    )
    extras = [
        f"{summary[key]} {word}"
        for key, word in (
            ("sleeping_workers", "sleeping"),
            ("stale_workers", "stale"),
            ("draining_workers", "draining"),
        )
        if summary.get(key)
    ]
    return text + ("" if not extras else ", " + ", ".join(extras))
