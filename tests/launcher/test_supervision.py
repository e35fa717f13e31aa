"""Supervision in-process: real worker processes (fakeworker.py), a real registry.

Each test bounds itself with `trio.fail_after`; every worker is found by its unique port and
checked gone by pid at the end.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio

from dsrouter.config import HealthConfig, LauncherConfig
from dsrouter.launcher import LaunchError, run_pool
from dsrouter.policies import make_policy
from dsrouter.registry import Health, ProbeOutcome, Registry, Worker
from tests.launcher.helpers import FAKE_WORKER, free_port_block, pids_running, wait_dead

TEST_TIMEOUT_S = 20.0


@pytest.fixture(autouse=True)
def _private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSROUTER_RUNTIME_DIR", str(tmp_path / "run"))


def _config(num_workers: int = 2, **changes: object) -> LauncherConfig:
    base = free_port_block(2 * num_workers + 2 * num_workers)
    settings = {
        "model": "fake/model", "num_workers": num_workers, "num_gpus_per_worker": 0,
        "command": FAKE_WORKER, "worker_base_port": base,
        "master_port_base": base + 2 * num_workers,
        "scheduler_port_base": base + 3 * num_workers,
        "wait_timeout_s": 10.0, "stop_timeout_s": 5.0, "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2, **changes,
    }
    return LauncherConfig(**settings)  # type: ignore[arg-type]


def _registry() -> Registry:
    return Registry(HealthConfig(), make_policy("least-request"))


@asynccontextmanager
async def _pool(cfg: LauncherConfig, registry: Registry,
                on_restart: Callable[[], None] = lambda: None) -> AsyncIterator[None]:
    """Run the pool; on exit cancel it and check every worker process is gone."""
    async with trio.open_nursery() as nursery:
        await nursery.start(run_pool, cfg, registry, on_restart)
        try:
            yield
        finally:
            nursery.cancel_scope.cancel()
    await wait_dead(pids_running(f"--port {cfg.worker_base_port}"), timeout_s=1)


def _managed(registry: Registry, index: int) -> Worker | None:
    return next((w for w in registry.workers()
                 if w.managed is not None and w.managed["index"] == index), None)


async def _until(check: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Poll a condition on the registry, the log or /proc until it holds (bounded)."""
    with trio.fail_after(timeout_s):
        while not check():  # noqa: ASYNC110 - conditions span processes and log records
            await trio.sleep(0.02)


async def test_workers_are_registered_healthy_with_their_supervisor_info() -> None:
    registry = _registry()
    cfg = _config()
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry):
            workers = sorted(registry.workers(), key=lambda w: w.url)
            assert [w.url for w in workers] == [
                f"http://127.0.0.1:{cfg.worker_base_port}",
                f"http://127.0.0.1:{cfg.worker_base_port + 2}"]
            assert all(w.routable and w.source == "launcher" for w in workers)
            info = workers[0].to_json()
            assert info["managed"] is True
            supervisor = info["supervisor"]
            assert supervisor == supervisor | {"index": 0, "restarts": 0, "state": "ready",
                                               "log_file": None}
            assert pids_running(f"--port {cfg.worker_base_port} ") == [supervisor["pid"]]
    assert registry.workers() == []


async def test_a_killed_worker_is_restarted_and_registered_again_while_others_stay() -> None:
    registry = _registry()
    cfg = _config()
    counted: list[None] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry, on_restart=lambda: counted.append(None)):
            victim = _managed(registry, 0)
            other = _managed(registry, 1)
            assert victim is not None and other is not None
            old_pid = victim.managed["pid"]  # type: ignore[index]
            os.kill(old_pid, signal.SIGKILL)

            def restarted() -> bool:
                assert _managed(registry, 1) is other and other.routable
                worker = _managed(registry, 0)
                return worker is not None and worker.managed["pid"] != old_pid  # type: ignore[index]

            await _until(restarted)
            worker = _managed(registry, 0)
            assert worker is not None and worker.routable
            assert worker.managed["restarts"] == 1  # type: ignore[index]
            assert worker.managed["last_exit"] == "killed by SIGKILL"  # type: ignore[index]
            assert len(counted) == 1
            await wait_dead([old_pid])


async def test_a_worker_reporting_itself_failed_is_restarted(http: httpx.AsyncClient) -> None:
    """WORKER_API.md §2: a worker that lost a GPU process answers /health 503 with an error
    and never exits by itself; once the health checker marks it dead, it is restarted."""
    registry = _registry()
    cfg = _config(num_workers=1, stop_timeout_s=2.0)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry):
            old = registry.workers()[0]
            await http.post(f"{old.url}/_fail")
            for _ in range(HealthConfig().failure_threshold):  # what the health checker does
                registry.apply_probe(old.url, ProbeOutcome.FAILED, "/health answered 503")
            await _until(lambda: bool(registry.workers()) and registry.workers()[0] is not old)
            info = registry.workers()[0].managed
            assert info is not None and info["restarts"] == 1
            assert info["last_exit"] == ("reported itself failed: Scheduler worker exited; "
                                         "restart the server. (killed by SIGTERM)")
            await wait_dead([old.managed["pid"]])  # type: ignore[index]


async def test_a_dead_but_not_failed_worker_is_left_to_the_health_checker(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = _registry()
    cfg = _config(num_workers=1, extra_args=["--log-requests"])
    caplog.set_level(logging.INFO, logger="dsrouter.worker.0")

    def health_requests() -> int:
        return sum("GET /health" in r.getMessage() for r in caplog.records)

    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry):
            worker = registry.workers()[0]
            seen = health_requests()
            for _ in range(HealthConfig().failure_threshold):
                registry.apply_probe(worker.url, ProbeOutcome.FAILED, "timed out")
            assert worker.health is Health.DEAD
            await _until(lambda: health_requests() > seen)  # the supervisor looked ...
            await trio.sleep(0.3)  # ... and, seeing 200, must not react (a negative check)
            assert registry.workers() == [worker]
            assert worker.managed["restarts"] == 0  # type: ignore[index]


async def test_exhausted_restarts_leave_the_worker_failed_and_the_rest_serving(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = _registry()
    cfg = _config(max_restarts=1)
    caplog.set_level(logging.INFO, logger="dsrouter.launcher")

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if "-> failed" in r.getMessage()]

    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry):
            first = _managed(registry, 0)
            assert first is not None
            os.kill(first.managed["pid"], signal.SIGKILL)  # type: ignore[index]
            await _until(lambda: _managed(registry, 0) not in (None, first))
            second = _managed(registry, 0)
            assert second is not None
            os.kill(second.managed["pid"], signal.SIGKILL)  # type: ignore[index]
            await _until(lambda: bool(failures()))
            assert failures() == ["worker 0: ready -> failed (killed by SIGKILL; 1 restart(s) "
                                  "within 600s already)"]
            assert _managed(registry, 0) is None
            survivor = _managed(registry, 1)
            assert survivor is not None and survivor.routable


async def test_an_exit_during_the_first_start_fails_the_launch_with_its_last_lines() -> None:
    registry = _registry()
    cfg = _config(extra_args=["--load-s", "30"])
    cfg = attrs.evolve(cfg, extra_args=[*cfg.extra_args,
                                        "--fail-on-port", str(cfg.worker_base_port + 2)])
    with trio.fail_after(TEST_TIMEOUT_S), pytest.raises(LaunchError) as caught:
        await run_pool(cfg, registry)
    message = str(caught.value)
    assert message.startswith(f"worker 1 (http://127.0.0.1:{cfg.worker_base_port + 2}) exited "
                              "during start-up (exit status 4); last lines of its output")
    assert "fakeworker: cannot load the model (simulated)" in message
    # worker 0 was still loading: it must not be left behind
    assert pids_running(f"--port {cfg.worker_base_port} ") == []
    assert registry.workers() == []


async def test_a_worker_not_ready_within_wait_timeout_fails_the_launch_and_is_killed() -> None:
    registry = _registry()
    cfg = _config(num_workers=1, wait_timeout_s=0.5, extra_args=["--load-s", "30"])
    with trio.fail_after(TEST_TIMEOUT_S), pytest.raises(LaunchError) as caught:
        await run_pool(cfg, registry)
    assert (f"was not ready within wait_timeout_s = 0.5 s (last: waiting for port "
            f"{cfg.worker_base_port})") in str(caught.value)
    assert pids_running(f"--port {cfg.worker_base_port} ") == []


async def test_a_missing_command_fails_before_anything_starts() -> None:
    cfg = _config(command=["dsrouter-no-such-worker-binary", "serve"])
    with pytest.raises(LaunchError, match="'dsrouter-no-such-worker-binary' not found"):
        await run_pool(cfg, _registry())


async def test_a_busy_port_fails_before_anything_starts() -> None:
    import socket

    cfg = _config()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", cfg.worker_base_port + 2))
        sock.listen()
        with pytest.raises(LaunchError, match="cannot reserve the launcher's ports"):
            await run_pool(cfg, _registry())
    assert pids_running(f"--port {cfg.worker_base_port} ") == []


async def test_log_dir_gets_one_file_per_worker(tmp_path: Path) -> None:
    registry = _registry()
    cfg = _config(log_dir=str(tmp_path / "logs"))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry):
            worker = _managed(registry, 1)
            assert worker is not None
            log_file = tmp_path / "logs" / "worker-1.log"
            assert worker.managed["log_file"] == str(log_file)  # type: ignore[index]
    text = log_file.read_text()
    assert f"fakeworker listening on http://127.0.0.1:{cfg.worker_base_port + 2}" in text
    assert text.startswith("---- dsrouter ")


async def test_a_worker_that_ignores_sigterm_is_killed_after_stop_timeout(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = _registry()
    cfg = _config(num_workers=1, stop_timeout_s=0.3, extra_args=["--ignore-sigterm"])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry):
            pid = registry.workers()[0].managed["pid"]  # type: ignore[index]
    await wait_dead([pid], timeout_s=1)
    assert any(f"pid {pid} did not stop within 0.3s of SIGTERM: SIGKILL" in r.getMessage()
               for r in caplog.records)


async def test_what_a_dead_worker_left_in_its_process_group_is_killed_with_it(
        caplog: pytest.LogCaptureFixture) -> None:
    registry = _registry()
    cfg = _config(num_workers=1, extra_args=["--grandchild"])
    caplog.set_level(logging.INFO, logger="dsrouter.worker.0")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry):
            def announced() -> list[str]:
                return [r.getMessage() for r in caplog.records
                        if "grandchild pid" in r.getMessage()]

            await _until(lambda: bool(announced()))
            grandchild = int(re.findall(r"\d+", announced()[0])[-1])
            old = registry.workers()[0]
            os.kill(old.managed["pid"], signal.SIGKILL)  # type: ignore[index]
            await wait_dead([grandchild], timeout_s=5)
            await _until(lambda: bool(registry.workers()) and registry.workers()[0] is not old)
