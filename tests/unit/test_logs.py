"""JSON logging covers what happens outside a request too: crashes and launch errors."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from dsrouter import daemon
from dsrouter.config import Config, LoadedConfig, LoggingConfig
from dsrouter.launcher import LaunchError
from dsrouter.logs import setup_logging


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """What the router would write to stderr with `logging.format = "json"`."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging(LoggingConfig(format="json"))
    stderr = io.StringIO()
    root.handlers[0].setStream(stderr)  # type: ignore[attr-defined]
    yield stderr
    root.handlers[:], level = saved
    root.setLevel(level)


def _run(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> int:
    async def failing(*args: object) -> None:
        raise error

    monkeypatch.setattr(daemon, "run_router", failing)
    return daemon.main_run(Config(), lambda: LoadedConfig(Config(), "(test)"))


def test_an_unexpected_error_is_one_json_line_with_its_traceback(
    json_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _run(monkeypatch, RuntimeError("boom")) == 1
    (line,) = json_logs.getvalue().splitlines()
    record = json.loads(line)
    assert record["level"] == "critical"
    assert "Traceback" in record["exc"] and "RuntimeError: boom" in record["exc"]


def test_every_line_of_a_launch_error_is_prefixed(
    json_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    error = BaseExceptionGroup("pool", [LaunchError("worker 0 exited\n    its last line")])
    assert _run(monkeypatch, error) == 1
    messages = [json.loads(line)["msg"] for line in json_logs.getvalue().splitlines()]
    assert messages == [
        "cannot launch the workers: worker 0 exited",
        "cannot launch the workers:     its last line",
    ]
