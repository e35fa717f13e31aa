"""Process helpers for the benchmarks: simulated workers and routers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_line(process: subprocess.Popen[str], marker: str, timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"process {process.pid} exited before printing {marker!r}")
        if marker in line:
            return line
    raise RuntimeError(f"no {marker!r} within {timeout_s}s")


@contextlib.contextmanager
def simworkers(*specs: list[str]) -> Iterator[list[str]]:
    """Start one simulated worker per spec (extra CLI args); yields their URLs."""
    processes, urls = [], []
    try:
        for args in specs:
            port = free_port()
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dsrouter.simworker",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    *args,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            processes.append(process)
            _wait_line(process, "simworker listening on")
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=20)
            if process.stdout:
                process.stdout.close()


@contextlib.contextmanager
def router(config: str, worker_urls: list[str]) -> Iterator[tuple[str, int]]:
    """Run a router with `config` (TOML text) and static workers; yields (url, pid)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "router.toml"
        workers = "".join(f'\n[[workers]]\nurl = "{url}"\n' for url in worker_urls)
        path.write_text(config + workers)
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dsrouter",
                "run",
                "--config",
                str(path),
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--log-level",
                "error",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            line = _wait_line(process, "dsrouter listening on")
            url = line.split("dsrouter listening on ", 1)[1].strip()
            wait_healthy(url, len(worker_urls))
            yield url, process.pid
        finally:
            process.terminate()
            process.wait(timeout=30)
            if process.stdout:
                process.stdout.close()


def wait_healthy(url: str, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{url}/health", timeout=5).json()
            if health.get("healthy_workers", 0) >= count:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{count} workers not healthy within {timeout_s}s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]
