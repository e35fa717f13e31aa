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
from dsrouter.launcher import LaunchError, Pool, run_pool
from dsrouter.launcher.rolling import IN_PLACE, RESTART_ONLY, ROLLING
from dsrouter.policies import make_policy
from dsrouter.registry import Health, ProbeOutcome, Registry, Worker
from tests.launcher.helpers import (
    FAKE_WORKER,
    launcher_settings,
    pids_running,
    wait_dead,
)

TEST_TIMEOUT_S = 20.0


@pytest.fixture(autouse=True)
def _private_runtime_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DSROUTER_RUNTIME_DIR", str(tmp_path / "run"))


def _config(num_workers: int = 2, **changes: object) -> LauncherConfig:
    fast = {
        "model": "fake/model",
        "wait_timeout_s": 10.0,
        "backoff_initial_s": 0.05,
        "backoff_max_s": 0.2,
        **changes,
    }
    settings = launcher_settings(num_workers, fast.pop("command", FAKE_WORKER), **fast)
    return LauncherConfig(**settings)  # type: ignore[arg-type]


def _registry() -> Registry:
    return Registry(HealthConfig(), make_policy("least-request"))


async def _no_capabilities(url: str) -> None:
    return None


async def _no_catch_up(url: str) -> None:
    return None


@asynccontextmanager
async def _pool(
    cfg: LauncherConfig, registry: Registry, on_restart: Callable[[str], None] = lambda worker: None
) -> AsyncIterator[Pool]:
    """Run the pool (and the registry task, with nothing to probe or catch up); on exit
    cancel it and check every worker process is gone."""
    async with trio.open_nursery() as nursery:
        await nursery.start(registry.run, _no_capabilities, _no_catch_up)
        pool = await nursery.start(run_pool, cfg, registry, on_restart)
        try:
            yield pool
        finally:
            nursery.cancel_scope.cancel()
    await wait_dead(pids_running(f"--port {cfg.worker_base_port}"), timeout_s=1)


def _managed(registry: Registry, index: int) -> Worker | None:
    return next(
        (w for w in registry.workers() if w.managed is not None and w.managed["index"] == index),
        None,
    )


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
                f"http://127.0.0.1:{cfg.worker_base_port + 2}",
            ]
            assert all(w.routable and w.source == "launcher" for w in workers)
            info = workers[0].to_json()
            assert info["managed"] is True
            supervisor = info["supervisor"]
            assert supervisor == supervisor | {
                "index": 0,
                "restarts": 0,
                "state": "ready",
                "log_file": None,
            }
            assert pids_running(f"--port {cfg.worker_base_port} ") == [supervisor["pid"]]
    assert registry.workers() == []


async def test_a_killed_worker_is_restarted_and_registered_again_while_others_stay() -> None:
    registry = _registry()
    cfg = _config()
    counted: list[str] = []
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry, on_restart=counted.append):
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
            assert info["last_exit"] == (
                "reported itself failed: Scheduler worker exited; "
                "restart the server. (killed by SIGTERM)"
            )
            await wait_dead([old.managed["pid"]])  # type: ignore[index]


async def test_a_dead_but_not_failed_worker_is_left_to_the_health_checker(
    caplog: pytest.LogCaptureFixture,
) -> None:
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
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = _registry()
    cfg = _config(max_restarts=1)
    caplog.set_level(logging.INFO, logger="dsrouter.launcher")

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if "-> failed" in r.getMessage()]

    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry) as pool:
            first = _managed(registry, 0)
            assert first is not None
            os.kill(first.managed["pid"], signal.SIGKILL)  # type: ignore[index]
            await _until(lambda: _managed(registry, 0) not in (None, first))
            second = _managed(registry, 0)
            assert second is not None
            os.kill(second.managed["pid"], signal.SIGKILL)  # type: ignore[index]
            await _until(lambda: bool(failures()))
            assert failures() == [
                "worker 0: ready -> failed (killed by SIGKILL; 1 restart(s) within 600s already)"
            ]
            assert _managed(registry, 0) is None
            survivor = _managed(registry, 1)
            assert survivor is not None and survivor.routable
            # Out of the registry, the failed worker is still one of the pool's slots.
            failed, serving = pool.managed_workers()
            assert failed == failed | {
                "index": 0,
                "url": first.url,
                "worker_id": first.worker_id,
                "state": "failed",
                "pid": None,
                "restarts": 1,
                "last_exit": "killed by SIGKILL",
                "detail": "killed by SIGKILL; 1 restart(s) within 600s already",
                "registered": False,
            }
            assert serving == survivor.managed | {
                "url": survivor.url,
                "registered": True,
                "worker_id": survivor.worker_id,
                "detail": serving["detail"],
            }
            assert serving["state"] == "ready" and serving["pid"] is not None
            await wait_dead([first.managed["pid"], second.managed["pid"]])  # type: ignore[index]


async def test_a_worker_waiting_to_restart_is_a_backoff_slot_without_a_process() -> None:
    registry = _registry()
    cfg = _config(backoff_initial_s=60.0, backoff_max_s=60.0)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry) as pool:
            assert [s["state"] for s in pool.managed_workers()] == ["ready", "ready"]
            victim = _managed(registry, 0)
            assert victim is not None
            os.kill(victim.managed["pid"], signal.SIGKILL)  # type: ignore[index]
            await _until(lambda: pool.managed_workers()[0]["state"] == "backoff")
            waiting, serving = pool.managed_workers()
            assert waiting == waiting | {
                "state": "backoff",
                "pid": None,
                "restarts": 1,
                "registered": False,
                "last_exit": "killed by SIGKILL",
                "detail": "killed by SIGKILL; restart 1 in 60 s",
            }
            assert _managed(registry, 0) is None
            assert serving["state"] == "ready" and serving["registered"] is True
            assert _managed(registry, 1) is not None


async def test_an_exit_during_the_first_start_fails_the_launch_with_its_last_lines() -> None:
    registry = _registry()
    cfg = _config(extra_args=["--load-s", "30"])
    cfg = attrs.evolve(
        cfg, extra_args=[*cfg.extra_args, "--fail-on-port", str(cfg.worker_base_port + 2)]
    )
    with trio.fail_after(TEST_TIMEOUT_S), pytest.raises(LaunchError) as caught:
        await run_pool(cfg, registry)
    message = str(caught.value)
    assert message.startswith(
        f"worker 1 (http://127.0.0.1:{cfg.worker_base_port + 2}) exited "
        "during start-up (exit status 4); last lines of its output"
    )
    assert "fakeworker: cannot load the model (simulated)" in message
    # worker 0 was still loading: it must not be left behind
    assert pids_running(f"--port {cfg.worker_base_port} ") == []
    assert registry.workers() == []


async def test_a_worker_not_ready_within_wait_timeout_fails_the_launch_and_is_killed() -> None:
    registry = _registry()
    cfg = _config(num_workers=1, wait_timeout_s=0.5, extra_args=["--load-s", "30"])
    with trio.fail_after(TEST_TIMEOUT_S), pytest.raises(LaunchError) as caught:
        await run_pool(cfg, registry)
    assert (
        f"was not ready within wait_timeout_s = 0.5 s (last: waiting for port "
        f"{cfg.worker_base_port})"
    ) in str(caught.value)
    assert pids_running(f"--port {cfg.worker_base_port} ") == []


async def test_a_worker_reporting_itself_failed_while_starting_fails_the_launch_at_once() -> None:
    """503 `{"status": "unhealthy"}` is final (unlike an empty 503 while warming up): the
    launch fails with the worker's own error, long before `wait_timeout_s`."""
    registry = _registry()
    cfg = _config(num_workers=1, wait_timeout_s=60.0, extra_args=["--failed-at-start"])
    with trio.fail_after(TEST_TIMEOUT_S), pytest.raises(LaunchError) as caught:
        await run_pool(cfg, registry)
    assert (
        "reported itself failed during start-up: Scheduler worker exited; restart the server."
    ) in str(caught.value)
    assert pids_running(f"--port {cfg.worker_base_port} ") == []
    assert registry.workers() == []


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
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = _registry()
    cfg = _config(num_workers=1, stop_timeout_s=0.3, extra_args=["--ignore-sigterm"])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry):
            pid = registry.workers()[0].managed["pid"]  # type: ignore[index]
    await wait_dead([pid], timeout_s=1)
    assert any(
        f"pid {pid} did not stop within 0.3s of SIGTERM: SIGKILL" in r.getMessage()
        for r in caplog.records
    )


async def test_what_a_dead_worker_left_in_its_process_group_is_killed_with_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = _registry()
    cfg = _config(num_workers=1, extra_args=["--grandchild"])
    caplog.set_level(logging.INFO, logger="dsrouter.worker.0")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry):

            def announced() -> list[str]:
                return [
                    r.getMessage() for r in caplog.records if "grandchild pid" in r.getMessage()
                ]

            await _until(lambda: bool(announced()))
            grandchild = int(re.findall(r"\d+", announced()[0])[-1])
            old = registry.workers()[0]
            os.kill(old.managed["pid"], signal.SIGKILL)  # type: ignore[index]
            await wait_dead([grandchild], timeout_s=5)
            await _until(lambda: bool(registry.workers()) and registry.workers()[0] is not old)


def _pid(registry: Registry, index: int) -> int | None:
    worker = _managed(registry, index)
    return None if worker is None else worker.managed["pid"]  # type: ignore[index]


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_every_launcher_key_is_applied_in_place_by_rolling_restart_or_after_a_restart() -> None:
    keys = [*IN_PLACE, *ROLLING, *RESTART_ONLY]
    assert sorted(keys) == sorted(a.name for a in attrs.fields(LauncherConfig))


async def test_a_rolling_restart_replaces_one_worker_at_a_time_and_keeps_one_routable(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = _registry()
    cfg = _config()
    caplog.set_level(logging.INFO, logger="dsrouter.launcher")
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry) as pool, trio.open_nursery() as nursery:
            old = {i: _pid(registry, i) for i in (0, 1)}
            routable: list[int] = []

            async def watch() -> None:
                while True:
                    routable.append(len(registry.routable()))
                    await registry.changed.wait()

            nursery.start_soon(watch)
            change = await pool.reconfigure(
                attrs.evolve(cfg, extra_args=["--log-requests"], stop_timeout_s=1.0)
            )
            assert change.in_place == ("launcher.stop_timeout_s",)
            assert change.restart_only == ()
            assert pool.apply(change, drain_timeout_s=1.0) == [0, 1]

            def rolled() -> bool:
                pids = [_pid(registry, i) for i in (0, 1)]
                return all(pid is not None and pid not in old.values() for pid in pids) and all(
                    w.routable for w in registry.workers()
                )

            await _until(rolled)
            await _until(
                lambda: any("rolling restart done" in r.getMessage() for r in caplog.records)
            )
            nursery.cancel_scope.cancel()
            assert min(routable) == 1, routable
            for index in (0, 1):
                worker = _managed(registry, index)
                assert worker is not None and worker.managed is not None
                assert "--log-requests" in _cmdline(worker.managed["pid"])
                assert worker.managed["restarts"] == 0
            # applied and idempotent: the same settings again restart nothing
            again = await pool.reconfigure(
                attrs.evolve(cfg, extra_args=["--log-requests"], stop_timeout_s=1.0)
            )
            assert again.in_place == () and pool.apply(again, drain_timeout_s=1.0) == []
            await wait_dead(old.values())  # type: ignore[arg-type]


async def test_a_roll_whose_new_settings_do_not_start_reverts_that_worker_and_stops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = _registry()
    cfg = _config()
    caplog.set_level(logging.INFO, logger="dsrouter.launcher")

    def stopped() -> list[str]:
        return [
            r.getMessage() for r in caplog.records if "rolling restart stopped" in r.getMessage()
        ]

    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry) as pool:
            first, second = _pid(registry, 0), _pid(registry, 1)
            change = await pool.reconfigure(attrs.evolve(cfg, extra_args=["--exit-at-start", "3"]))
            assert pool.apply(change, drain_timeout_s=1.0) == [0, 1]
            await _until(lambda: bool(stopped()))
            assert stopped()[0].startswith(
                "rolling restart stopped at worker 0: it did not come up with the new settings "
                "(exited during start-up (exit status 3)). Worker(s) [0, 1] keep their "
                "previous settings"
            )
            await _until(lambda: _pid(registry, 0) not in (None, first))
            back = _managed(registry, 0)
            assert back is not None and back.routable
            assert "--exit-at-start" not in _cmdline(back.managed["pid"])  # type: ignore[index]
            assert back.managed["restarts"] == 0  # type: ignore[index]
            assert _pid(registry, 1) == second


async def test_resizes_port_moves_and_gpu_swaps_wait_for_a_restart() -> None:
    registry = _registry()
    cfg = _config(num_gpus_per_worker=1, gpu_ids=[["0"], ["1"]])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry) as pool:
            plans = pool.plans
            resized = await pool.reconfigure(
                attrs.evolve(
                    cfg,
                    num_workers=3,
                    worker_base_port=cfg.worker_base_port + 100,
                    gpu_ids=[["1"], ["0"], ["2"]],
                    max_restarts=9,
                )
            )
            assert resized.restart_only == (
                "launcher.num_workers",
                "launcher.worker_base_port",
                "launcher.gpu_ids",
            )
            assert resized.in_place == ("launcher.max_restarts",)
            assert resized.plans == plans
            assert pool.apply(resized, drain_timeout_s=1.0) == []
            assert pool.cfg.max_restarts == 9 and pool.cfg.gpu_ids == [["0"], ["1"]]
            # GPUs nobody holds now may be added to a worker: that rolls
            wider = await pool.reconfigure(
                attrs.evolve(cfg, num_gpus_per_worker=2, gpu_ids=[["0", "2"], ["1", "3"]])
            )
            assert wider.restart_only == ()
            assert [plan.gpus for plan in wider.plans] == [("0", "2"), ("1", "3")]


async def test_a_reload_during_a_roll_retargets_it_and_the_newest_settings_win(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = _registry()
    cfg = _config()
    caplog.set_level(logging.INFO, logger="dsrouter.launcher")

    def logged(text: str) -> int:
        return sum(text in r.getMessage() for r in caplog.records)

    with trio.fail_after(TEST_TIMEOUT_S):
        async with _pool(cfg, registry) as pool:
            first = await pool.reconfigure(attrs.evolve(cfg, extra_args=["--log-requests"]))
            assert pool.apply(first, drain_timeout_s=1.0) == [0, 1]
            await _until(lambda: logged("restarting worker 0") == 1)
            newest = await pool.reconfigure(attrs.evolve(cfg, extra_args=["--load-s", "0.1"]))
            assert pool.apply(newest, drain_timeout_s=1.0) == [0, 1]
            await _until(lambda: logged("rolling restart done") == 1)
            for index in (0, 1):
                cmdline = _cmdline(_pid(registry, index))  # type: ignore[arg-type]
                assert "--load-s 0.1" in cmdline and "--log-requests" not in cmdline
            assert logged("restarting worker 0") == 2 and logged("restarting worker 1") == 1
