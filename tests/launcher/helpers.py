"""Helpers for the launcher tests: free port blocks, polling, process checks."""

from __future__ import annotations

import random
import socket
import sys
from collections.abc import Iterable
from pathlib import Path

import trio

FAKE_WORKER = [sys.executable, str(Path(__file__).with_name("fakeworker.py"))]
"""The stdlib stand-in worker (fakeworker.py): starts in ~50 ms, misbehaves on request."""
SIM_WORKER = [sys.executable, "-m", "dsrouter.simworker"]


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(size: int) -> int:
    """The first port of `size` consecutive ports that are all free right now.

    Drawn from below the kernel's ephemeral range, so outgoing connections of other tests
    do not take them in the meantime.
    """
    low, _ = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(200):
        base = random.randrange(20000, max(20001, low - size))
        if all(_bindable(port) for port in range(base, base + size)):
            return base
    raise AssertionError(f"no block of {size} free ports found")


def launcher_settings(
    num_workers: int,
    command: list[str],
    **changes: object,
) -> dict[str, object]:
    """`[launcher]` keys for `num_workers` workers on a block of free ports, fast backoff."""
    base = free_port_block(4 * num_workers)
    return {
        "model": "sim/Wan-Sim-T2V",
        "num_workers": num_workers,
        "num_gpus_per_worker": 0,
        "command": command,
        "worker_base_port": base,
        "master_port_base": base + 2 * num_workers,
        "scheduler_port_base": base + 3 * num_workers,
        "internal_port_stride": 1,
        "backoff_initial_s": 0.1,
        "backoff_max_s": 0.5,
        "wait_timeout_s": 30.0,
        "stop_timeout_s": 5.0,
        **changes,
    }


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


async def wait_dead(pids: Iterable[int], timeout_s: float = 15.0) -> None:
    """Poll /proc until every pid is gone; fail naming the survivors at the deadline."""
    pids = list(pids)
    with trio.move_on_after(timeout_s):
        while any(map(alive, pids)):  # noqa: ASYNC110 - other processes, no event to wait on
            await trio.sleep(0.05)
        return
    raise AssertionError(f"still alive after {timeout_s}s: {[p for p in pids if alive(p)]}")


def pids_running(*needles: str) -> list[int]:
    """Live processes whose command line contains every needle (to find what we started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if all(needle in cmdline for needle in needles) and alive(int(entry.name)):
            found.append(int(entry.name))
    return found
