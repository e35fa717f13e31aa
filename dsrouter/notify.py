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
from collections.abc import Callable

import trio

log = logging.getLogger("dsrouter.notify")

STATUS_INTERVAL_S = 5.0


def socket_address(name: str) -> str | bytes:
    """`$NOTIFY_SOCKET` as an AF_UNIX address: `@name` is abstract, the rest a path."""
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    return name


class Notifier:
    """Sends notify messages; a no-op when the service manager did not ask for them."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        name = env.get("NOTIFY_SOCKET", "")
        self.address = socket_address(name) if name else None
        self.watchdog_s = _watchdog_interval(env)
        self.last_status = ""

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> None:
        """One datagram; failures are logged, never raised (notification is best effort)."""
        if self.address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto("\n".join(fields).encode(), self.address)
            except OSError as exc:
                log.warning("cannot notify the service manager (%s): %s", self.address, exc)

    def ready(self, status: str) -> None:
        self.last_status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        if status != self.last_status:
            self.last_status = status
            self.send(f"STATUS={status}")

    def stopping(self) -> None:
        self.send("STOPPING=1", "STATUS=draining in-flight requests")

    def reloading(self) -> None:
        """Reload start; systemd (>= 253) wants the monotonic time of it with `RELOADING=1`."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    async def run(self, describe: Callable[[], str],
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping the watchdog at half its interval and refresh STATUS while the loop runs."""
        task_status.started()
        if not self.enabled:
            return
        interval = min(self.watchdog_s / 2, STATUS_INTERVAL_S) if self.watchdog_s \
            else STATUS_INTERVAL_S
        while True:
            if self.watchdog_s:
                self.send("WATCHDOG=1")
            self.status(describe())
            await trio.sleep(interval)


def _watchdog_interval(env: dict[str, str] | os._Environ[str]) -> float | None:
    """`$WATCHDOG_USEC` in seconds, if it is meant for this process (`$WATCHDOG_PID`)."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def describe_pool(summary: dict[str, int]) -> str:
    """`6/8 workers healthy, 0 queued` (plus what is unusual) for `systemctl status`."""
    text = f"{summary['healthy_workers']}/{summary['total_workers']} workers healthy, " \
           f"{summary['queued']} queued"
    extras = [f"{summary[key]} {word}" for key, word in
              (("sleeping_workers", "sleeping"), ("stale_workers", "stale"),
               ("draining_workers", "draining")) if summary.get(key)]
    return text + ("" if not extras else ", " + ", ".join(extras))
