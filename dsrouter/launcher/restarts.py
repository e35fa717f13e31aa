"""When a worker that stopped gets started again: the restart policy, kept free of I/O.

`never` never restarts; `on-failure` restarts after a non-zero exit, a death by signal, or a
start that failed; `always` also restarts after a clean exit. At most `max_restarts`
restarts happen within any `restart_window_s`; one more marks the worker failed (the rest of
the pool keeps serving). The delay before a restart doubles with every restart still inside
the window, from `backoff_initial_s` up to `backoff_max_s`, so a crash loop slows down and a
worker that has been stable for a window starts over at the initial delay.
"""

from __future__ import annotations

import collections

import attrs

from dsrouter.config import LauncherConfig


@attrs.frozen
class Decision:
    restart: bool
    delay_s: float = 0.0
    reason: str = ""


class RestartTracker:
    """The restart history of one worker; `decide` is called once per stop."""

    def __init__(self, cfg: LauncherConfig) -> None:
        self.cfg = cfg
        self._recent: collections.deque[float] = collections.deque()
        self.total = 0
        """Restarts so far (shown as `restarts` in `/workers`)."""

    def decide(self, now: float, failed: bool) -> Decision:
        """Whether to restart a worker that stopped at `now` (`failed`: not a clean exit)."""
        cfg = self.cfg
        if cfg.restart == "never":
            return Decision(False, reason="restart policy is 'never'")
        if cfg.restart == "on-failure" and not failed:
            return Decision(False, reason="exited cleanly and the restart policy is on-failure")
        while self._recent and self._recent[0] <= now - cfg.restart_window_s:
            self._recent.popleft()
        if len(self._recent) >= cfg.max_restarts:
            return Decision(
                False,
                reason=f"{cfg.max_restarts} restart(s) within {cfg.restart_window_s:g}s already",
            )
        delay = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** len(self._recent))
        self._recent.append(now)
        self.total += 1
        return Decision(True, delay)
