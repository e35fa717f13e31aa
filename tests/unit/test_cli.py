"""Command-line papercuts: what a new user types first must answer clearly."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dsrouter import __version__
from dsrouter.cli import build_parser, main
from dsrouter.config import Config
from dsrouter.logs import python_level
from dsrouter.policies import POLICIES


@pytest.mark.parametrize("count", ["-1", "0", "two"])
def test_a_demo_without_workers_is_a_usage_error_not_a_traceback(
    count: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--demo", "--demo-workers", count])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "argument --demo-workers:" in err and "Traceback" not in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"dsrouter {__version__}"


def test_routing_algorithm_help_lists_every_policy_and_the_default() -> None:
    run = build_parser()._subparsers._group_actions[0].choices["run"]  # type: ignore[union-attr]
    (action,) = [a for a in run._actions if a.dest == "routing_algorithm"]
    assert action.help is not None
    assert all(name in action.help for name in POLICIES)
    assert "(default least-work)" in action.help


@pytest.mark.parametrize("given", ["trace", "TRACE", "Warning", "critical"])
def test_every_log_level_uvicorn_took_from_sglang_d_router_is_accepted(
    given: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """sglang-d-router handed `--log-level` to uvicorn, which lower-cases it and knows
    `trace`; a start command using either must not stop at a config error."""
    assert main(["check-config", "--log-level", given]) == 0
    assert json.loads(capsys.readouterr().out)["logging"]["level"] == given.lower()


def test_trace_logs_everything_debug_does() -> None:
    assert python_level("trace") == python_level("debug") == logging.DEBUG
    assert python_level("critical") == logging.CRITICAL


def test_the_predecessors_defaults_and_the_settings_that_bring_them_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The defaults MIGRATING.md says differ from sglang-d-router's, the ones it says are
    the same, and its recipe for the old ones: if a default moves, that page must too."""
    changed = Config()
    assert changed.server.request_timeout_s == 1800.0  # sglang-d-router: 120
    assert changed.server.max_connections == 1000  # 100
    assert changed.routing.algorithm == "least-work"  # least-request
    assert changed.routing.max_attempts == 3  # 1: no second worker
    assert changed.routing.match_model is True  # the field was not looked at
    same = (changed.server.host, changed.server.port, changed.health.interval_s)
    assert same == ("0.0.0.0", 30080, 10.0)
    assert (changed.health.failure_threshold, changed.health.timeout_s) == (3, 5.0)

    toml = tmp_path / "router.toml"
    toml.write_text("[routing]\nmax_attempts = 1\nmatch_model = false\n")
    old = ["--timeout", "120", "--max-connections", "100", "--routing-algorithm", "least-request"]
    assert main(["check-config", "--config", str(toml), *old]) == 0
    dumped = json.loads(capsys.readouterr().out)
    assert dumped["server"]["request_timeout_s"] == 120.0
    assert dumped["server"]["max_connections"] == 100
    assert dumped["routing"]["algorithm"] == "least-request"
    assert dumped["routing"]["max_attempts"] == 1
    assert dumped["routing"]["match_model"] is False


@pytest.mark.parametrize(
    "flag",
    [
        "--health-check-interval",
        "--health-check-failure-threshold",
        "--timeout",
        "--max-connections",
    ],
)
def test_a_zero_sglang_d_router_took_but_could_not_serve_with_is_a_config_error(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """sglang-d-router accepted 0 here (a busy probe loop, or requests that all failed);
    MIGRATING.md lists the refusal, which names the flag."""
    assert main(["check-config", flag, "0"]) == 2
    assert f"config error: {flag}: expected" in capsys.readouterr().err
