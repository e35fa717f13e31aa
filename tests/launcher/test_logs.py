"""Worker output: size-bounded files with one old file kept, lines, the in-memory tail."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
import trio.testing

from dsrouter.launcher.logs import TAIL_LINES, RotatingFile, WorkerOutput


def test_the_file_rotates_before_it_would_exceed_its_size_and_keeps_one_old_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "worker-0.log"
    log = RotatingFile(path, max_bytes=10)
    for chunk in (b"aaaa\n", b"bbbb\n", b"cccc\n", b"dddd\n", b"eeee\n"):
        log.write(chunk)
    log.close()
    assert path.read_bytes() == b"eeee\n"
    assert (tmp_path / "worker-0.log.1").read_bytes() == b"cccc\ndddd\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["worker-0.log", "worker-0.log.1"]


async def _feed(output: WorkerOutput, chunks: list[bytes]) -> None:
    send, receive = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(output.pump, receive)
        for chunk in chunks:
            await send.send_all(chunk)
        await send.aclose()


async def test_output_goes_to_the_file_line_by_line_with_a_run_marker(tmp_path: Path) -> None:
    output = WorkerOutput(3, tmp_path / "logs", max_bytes=1 << 20)
    output.begin_run("starting worker 3: sglang serve")
    await _feed(output, [b"loading 10%\rloading 50", b"%\r\nready\nno newline at end"])
    output.close()
    lines = (tmp_path / "logs" / "worker-3.log").read_text().splitlines()
    assert lines[0].startswith("---- dsrouter ") and lines[0].endswith(
        ": starting worker 3: sglang serve"
    )
    assert lines[1:] == ["loading 10%", "loading 50%", "ready", "no newline at end"]


async def test_without_log_dir_lines_go_to_the_router_log_under_the_worker_index(
    caplog: pytest.LogCaptureFixture,
) -> None:
    output = WorkerOutput(5, None, max_bytes=1)
    output.begin_run("run")
    with caplog.at_level(logging.INFO, logger="dsrouter.worker.5"):
        await _feed(output, [b"hello\nworld\n"])
    assert [(r.name, r.getMessage()) for r in caplog.records] == [
        ("dsrouter.worker.5", "hello"),
        ("dsrouter.worker.5", "world"),
    ]


async def test_the_tail_keeps_the_last_lines_of_the_current_run_only() -> None:
    output = WorkerOutput(0, None, max_bytes=1)
    output.begin_run("first")
    await _feed(output, [b"old\n"])
    output.begin_run("second")
    await _feed(output, [b"".join(f"line {i}\n".encode() for i in range(50))])
    assert list(output.tail) == [f"line {i}" for i in range(50 - TAIL_LINES, 50)]
    assert output.describe_tail().startswith("last lines of its output (the router's log):")


def test_log_prefix_marks_worker_lines_in_the_routers_log(caplog: pytest.LogCaptureFixture) -> None:
    """sglang-d-router's YAML key `log_prefix`, applied where its lines went: the router's
    own output."""
    output = WorkerOutput(2, None, max_bytes=1, prefix="[local-launcher]")
    with caplog.at_level(logging.INFO, logger="dsrouter.worker.2"):
        output.line("model loaded")
    assert [r.getMessage() for r in caplog.records] == ["[local-launcher] model loaded"]
