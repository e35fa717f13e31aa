"""The port plan of a pool, and the check that every port in it can be reserved.

A worker binds more than its HTTP port (WORKER_API.md §1.2): its offline broker silently
binds HTTP port + 1 and is never moved, and its scheduler and torch rendezvous take
`--scheduler-port` and `--master-port`. The launcher passes explicit ports and
`--strict-ports true`, so a collision fails fast instead of moving silently; this module
catches collisions even earlier, before any worker is spawned, by binding each port once.
"""

from __future__ import annotations

import errno
import socket

import attrs

from dsrouter.config import LauncherConfig
from dsrouter.launcher.errors import LaunchError

LOOPBACK = "127.0.0.1"


@attrs.frozen
class WorkerPorts:
    """Every port one worker binds."""

    http: int
    master: int
    scheduler: int
    replicas: int = 1
    """`--dp-size`: each replica binds its own scheduler port, from `scheduler` upwards."""

    @property
    def broker(self) -> int:
        """Bound by the worker itself, always HTTP port + 1 (no flag moves it)."""
        return self.http + 1

    def labelled(self) -> list[tuple[str, int]]:
        schedulers = [("scheduler port", self.scheduler)] + [
            (f"scheduler port of dp replica {i}", self.scheduler + i)
            for i in range(1, self.replicas)
        ]
        return [
            ("HTTP port", self.http),
            ("broker port (HTTP port + 1)", self.broker),
            ("master port", self.master),
            *schedulers,
        ]


DP_FLAGS = ("--dp-size", "--data-parallel-size", "--dp")


def dp_size(args: list[str]) -> int:
    """The worker's `--dp-size` (or its aliases) in `extra_args`; 1 when not given."""
    size = "1"
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name in DP_FLAGS:
            size = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    if not size.isdigit() or int(size) < 1:
        raise LaunchError(f"launcher.extra_args: --dp-size must be a number >= 1, got {size!r}")
    return int(size)


def plan_ports(cfg: LauncherConfig) -> list[WorkerPorts]:
    """Worker i gets HTTP port `worker_base_port + i * port_stride`, internal ports
    `master_port_base` / `scheduler_port_base` `+ i * internal_port_stride`.

    Raises `LaunchError` when the plan contradicts itself: a stride below 2 (worker i + 1
    would bind the broker port of worker i), a port beyond 65535, or two purposes sharing a
    port.
    """
    if cfg.num_workers > 1 and cfg.port_stride < 2:
        raise LaunchError(
            f"launcher.port_stride is {cfg.port_stride}, it must be at least 2: every worker "
            "also binds its HTTP port + 1 (the offline broker)"
        )
    replicas = dp_size(cfg.extra_args)
    plan = [
        WorkerPorts(
            http=cfg.worker_base_port + i * cfg.port_stride,
            master=cfg.master_port_base + i * cfg.internal_port_stride,
            scheduler=cfg.scheduler_port_base + i * cfg.internal_port_stride,
            replicas=replicas,
        )
        for i in range(cfg.num_workers)
    ]
    owners: dict[int, str] = {}
    problems = []
    labelled = [
        (f"worker {index} {label}", port)
        for index, ports in enumerate(plan)
        for label, port in ports.labelled()
    ]
    # HTTP and broker ports claim their numbers first, so a clash names the internal port.
    labelled.sort(key=lambda entry: "HTTP" not in entry[0])
    for owner, port in labelled:
        if not 1 <= port <= 65535:
            problems.append(f"{owner} would be {port}, outside 1..65535")
        elif port in owners:
            problems.append(f"{owner} {port} is also {owners[port]}")
        else:
            owners[port] = owner
    if problems:
        raise LaunchError(
            "the launcher's port plan overlaps itself; change worker_base_port, "
            "master_port_base, scheduler_port_base or the strides (a worker with --dp-size N "
            "takes N consecutive scheduler ports):\n  " + "\n  ".join(problems)
        )
    return plan


def bind_host(worker_host: str) -> str:
    """The address the worker binds its HTTP port on (sglang's own default when empty)."""
    return worker_host or LOOPBACK


def check_ports_free(plan: list[WorkerPorts], worker_host: str) -> None:
    """Bind every planned port once; raise `LaunchError` naming each one that is taken.

    HTTP ports are tried on the worker's own bind address; the broker, master and scheduler
    ports on loopback, where the worker binds them on a single node. Bound with SO_REUSEADDR,
    as the worker does, so a port that only has connections in TIME_WAIT counts as free.
    """
    busy = []
    for index, ports in enumerate(plan):
        for label, port in ports.labelled():
            host = bind_host(worker_host) if label == "HTTP port" else LOOPBACK
            problem = _try_bind(host, port)
            if problem:
                busy.append(f"worker {index} {label} {host}:{port}: {problem}")
    if busy:
        raise LaunchError(
            "cannot reserve the launcher's ports (stop what holds them, change "
            "worker_base_port / master_port_base / scheduler_port_base, or set "
            "launcher.scan_ports = true to take the next free ones):\n  " + "\n  ".join(busy)
        )


def scan_free_ports(plan: list[WorkerPorts], worker_host: str) -> list[WorkerPorts]:
    """sglang-d-router's way with a busy port (`launcher.scan_ports`): each planned port
    that cannot be bound moves up to the next one that can, never to a port the plan gives
    anyone else. An HTTP port moves with its broker port (+ 1), a scheduler port with its
    replicas' ports. Raises `LaunchError` when the scan runs past 65535."""
    taken = {port for ports in plan for _, port in ports.labelled()}
    moved: set[int] = set()

    def settle(preferred: int, width: int, host: str) -> int:
        port = preferred
        while port + width - 1 <= 65535:
            block = range(port, port + width)
            mine = preferred == port
            if all(
                (mine or p not in taken) and p not in moved and _try_bind(host, p) is None
                for p in block
            ):
                moved.update(block)
                return port
            port += 1
        raise LaunchError(f"no free port from {preferred} up to 65535 ({host})")

    return [
        attrs.evolve(
            ports,
            http=settle(ports.http, 2, bind_host(worker_host)),
            master=settle(ports.master, 1, LOOPBACK),
            scheduler=settle(ports.scheduler, ports.replicas, LOOPBACK),
        )
        for ports in plan
    ]


def _try_bind(host: str, port: int) -> str | None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "already in use"
            return exc.strerror or str(exc)
    return None
