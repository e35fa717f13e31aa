"""Command-line papercuts: what a new user types first must answer clearly."""

from __future__ import annotations

import pytest

from dsrouter import __version__
from dsrouter.cli import build_parser, main
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
