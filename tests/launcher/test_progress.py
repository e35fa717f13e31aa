"""Progress: a log line per state change, a live summary on terminals only."""

from __future__ import annotations

import io
import logging

import pytest
import trio
import trio.testing

from dsrouter.launcher.progress import LOG_INTERVAL_S, Progress


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_the_summary_counts_ready_workers_and_names_the_first_one_in_progress(
    autojump_clock: trio.testing.MockClock,
) -> None:
    progress = Progress(8, stream=io.StringIO())
    for index in range(8):
        progress.set_state(index, "starting", f"pid {100 + index}")
    for index in range(3):
        progress.set_state(index, "ready")
    await trio.sleep(41)
    progress.set_detail(3, "waiting for port 10096")
    assert progress.summary() == "3/8 ready · 41 s · worker 3: waiting for port 10096"
    progress.set_state(3, "failed", "exit status 1")
    assert progress.summary() == "3/8 ready · 41 s · worker 4: pid 104 · 1 failed"


async def test_every_state_change_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dsrouter.launcher")
    progress = Progress(1, stream=io.StringIO())
    progress.set_state(0, "starting", "pid 7")
    progress.set_state(0, "starting", "pid 7")
    progress.set_state(0, "ready", "pid 7, http://127.0.0.1:10090")
    progress.set_state(0, "failed", "killed by SIGKILL")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", "worker 0: starting (pid 7)"),
        ("INFO", "worker 0: starting -> ready (pid 7, http://127.0.0.1:10090)"),
        ("WARNING", "worker 0: ready -> failed (killed by SIGKILL)"),
    ]


async def test_the_live_line_is_drawn_on_a_terminal_and_erased_once_all_settle(
    autojump_clock: trio.testing.MockClock,
) -> None:
    terminal = FakeTerminal()
    progress = Progress(2, stream=terminal)
    progress.set_state(0, "starting")
    progress.set_state(1, "starting")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(progress.run)
        await trio.sleep(1.2)
        assert terminal.getvalue().endswith("\r\x1b[K0/2 ready · 1 s · worker 0: starting")
        progress.set_state(0, "ready")
        progress.set_state(1, "ready")
        assert terminal.getvalue().endswith("\r\x1b[K")
        await trio.sleep(5)
        assert terminal.getvalue().endswith("\r\x1b[K")
        nursery.cancel_scope.cancel()


async def test_no_live_line_when_stderr_is_not_a_terminal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    stream = io.StringIO()
    progress = Progress(1, stream=stream)
    progress.set_state(0, "starting")
    with trio.move_on_after(5):
        await progress.run()
    assert stream.getvalue() == ""


async def test_without_a_terminal_each_waiting_worker_is_logged_at_a_bounded_rate(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """journald gets a line per waiting worker every LOG_INTERVAL_S, not one per redraw."""
    caplog.set_level(logging.INFO, logger="dsrouter.launcher")
    outputs = {0: "Loading safetensors shard 3/8", 1: None}
    progress = Progress(3, stream=io.StringIO(), last_output=outputs.get)
    for index in range(3):
        progress.set_state(index, "starting", f"pid {index}")
    progress.set_state(2, "ready")
    progress.set_detail(0, "warming up")
    caplog.clear()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(progress.run)
        await trio.sleep(3 * LOG_INTERVAL_S + 1)
        nursery.cancel_scope.cancel()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6  # two waiting workers, three intervals
    assert lines[:2] == [
        "worker 0: starting for 15 s: warming up; last output: Loading safetensors shard 3/8",
        "worker 1: starting for 15 s: pid 1",
    ]
    assert lines[4].startswith("worker 0: starting for 45 s")


async def test_a_worker_that_dies_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dsrouter.launcher")
    progress = Progress(1, stream=io.StringIO())
    progress.set_state(0, "ready")
    progress.set_state(0, "backoff", "killed by SIGKILL; restart 1 in 1 s")
    assert [(r.levelname, r.getMessage()) for r in caplog.records][-1] == (
        "WARNING",
        "worker 0: ready -> backoff (killed by SIGKILL; restart 1 in 1 s)",
    )
