"""Cleanup after a SIGKILLed router: only processes carrying a dead router's token die."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import trio

from dsrouter.launcher.pidfile import (
    TOKEN_VAR,
    clean_stale,
    open_pidfile,
    runtime_dir,
)
from tests.launcher.helpers import alive, wait_dead

SLEEPER = ["sleep", "3600"]


async def _sleeper(nursery: trio.Nursery, token: str | None) -> trio.Process:
    env = {**os.environ, **({TOKEN_VAR: token} if token else {})}
    process = await trio.lowlevel.open_process(SLEEPER, env=env)

    async def reap() -> None:
        try:
            await process.wait()
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    process.kill()
                await process.wait()

    nursery.start_soon(reap)
    return process


def _write_record(directory: Path, pid: int, start: str | None, token: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"router-{pid}.json"
    path.write_text(
        json.dumps(
            {"router_pid": pid, "router_start": start, "token": token, "groups": {"0": 12345}}
        )
    )
    return path


def _own_start_time() -> str:
    return Path(f"/proc/{os.getpid()}/stat").read_text().rpartition(")")[2].split()[19]


async def test_processes_of_a_dead_router_are_killed_and_nothing_else(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    record = _write_record(directory, 5_000_000, "1", "deadbeef")  # above any pid_max
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            victim = await _sleeper(nursery, "deadbeef")
            bystander = await _sleeper(nursery, "cafe")
            plain = await _sleeper(nursery, None)
            assert await clean_stale(directory) == 1
            await wait_dead([victim.pid])
            assert alive(bystander.pid) and alive(plain.pid)
            assert not record.exists()
            nursery.cancel_scope.cancel()


async def test_the_record_of_a_running_router_is_left_alone(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    record = _write_record(directory, os.getpid(), _own_start_time(), "livetoken")
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            worker = await _sleeper(nursery, "livetoken")
            assert await clean_stale(directory) == 0
            assert alive(worker.pid) and record.exists()
            nursery.cancel_scope.cancel()


async def test_a_recycled_router_pid_does_not_make_a_dead_router_look_alive(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    record = _write_record(directory, os.getpid(), "0", "oldtoken")  # same pid, other start
    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            victim = await _sleeper(nursery, "oldtoken")
            assert await clean_stale(directory) == 1
            await wait_dead([victim.pid])
            assert not record.exists()
            nursery.cancel_scope.cancel()


def test_the_pid_file_records_each_worker_group_and_is_removed_at_the_end(tmp_path: Path) -> None:
    pidfile = open_pidfile(tmp_path / "run")
    assert pidfile.path == tmp_path / "run" / f"router-{os.getpid()}.json"
    pidfile.set_group(0, 111)
    pidfile.set_group(1, 222)
    pidfile.set_group(0, None)
    record = json.loads(pidfile.path.read_text())
    assert record == {
        "router_pid": os.getpid(),
        "router_start": _own_start_time(),
        "token": pidfile.token,
        "groups": {"1": 222},
    }
    assert (tmp_path / "run").stat().st_mode & 0o777 == 0o700
    pidfile.remove()
    assert not pidfile.path.exists()


def test_runtime_dir_prefers_the_override_then_xdg_then_tmp() -> None:
    assert runtime_dir({"DSROUTER_RUNTIME_DIR": "/x", "XDG_RUNTIME_DIR": "/y"}) == Path("/x")
    assert runtime_dir({"XDG_RUNTIME_DIR": "/run/user/7"}) == Path("/run/user/7/dsrouter")
    assert runtime_dir({}) == Path(f"/tmp/dsrouter-{os.getuid()}")


def test_a_runtime_dir_that_is_not_a_directory_disables_the_pid_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    squatted = tmp_path / "run"
    squatted.write_text("")
    pidfile = open_pidfile(squatted)
    assert pidfile.path is None
    pidfile.set_group(0, 1)
    assert "not a directory owned by this user" in caplog.text
