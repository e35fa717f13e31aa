"""The restart policy: backoff, the window, the limit, the three policies."""

from __future__ import annotations

from dsrouter.config import LauncherConfig
from dsrouter.launcher.restarts import Decision, RestartTracker


def _tracker(**changes: object) -> RestartTracker:
    settings = {
        "backoff_initial_s": 1.0,
        "backoff_max_s": 5.0,
        "max_restarts": 10,
        "restart_window_s": 100.0,
        **changes,
    }
    return RestartTracker(LauncherConfig(**settings))  # type: ignore[arg-type]


def test_backoff_doubles_from_the_initial_delay_up_to_the_maximum() -> None:
    tracker = _tracker()
    delays = [tracker.decide(now=float(t), failed=True).delay_s for t in range(6)]
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert tracker.total == 6


def test_restarts_that_left_the_window_no_longer_slow_down_the_next_one() -> None:
    tracker = _tracker()
    assert tracker.decide(0.0, True).delay_s == 1.0
    assert tracker.decide(10.0, True).delay_s == 2.0
    assert tracker.decide(105.0, True).delay_s == 2.0  # the one at 0 left the window
    assert tracker.decide(250.0, True).delay_s == 1.0


def test_max_restarts_within_the_window_then_failed() -> None:
    tracker = _tracker(max_restarts=2)
    assert tracker.decide(0.0, True).restart
    assert tracker.decide(1.0, True).restart
    third = tracker.decide(2.0, True)
    assert not third.restart
    assert third.reason == "2 restart(s) within 100s already"
    assert tracker.total == 2


def test_the_limit_is_per_window_not_per_lifetime() -> None:
    tracker = _tracker(max_restarts=1)
    assert tracker.decide(0.0, True).restart
    assert not tracker.decide(50.0, True).restart
    assert tracker.decide(101.0, True).restart


def test_max_restarts_zero_never_restarts() -> None:
    assert not _tracker(max_restarts=0).decide(0.0, True).restart


def test_policy_never_does_not_restart_even_a_crash() -> None:
    decision = _tracker(restart="never").decide(0.0, True)
    assert decision == Decision(False, reason="restart policy is 'never'")


def test_on_failure_does_not_restart_a_clean_exit_but_always_does() -> None:
    assert not _tracker(restart="on-failure").decide(0.0, failed=False).restart
    assert _tracker(restart="on-failure").decide(0.0, failed=True).restart
    assert _tracker(restart="always").decide(0.0, failed=False).restart
