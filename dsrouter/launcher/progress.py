"""Launch progress for humans: model loading takes minutes, so say what is happening.

Every supervisor state change is one log line (a worker that dies, `backoff` or `failed`,
is a WARNING). When stderr is a terminal, a live summary is redrawn in place while any
worker is on its way up (`3/8 ready · 41 s · worker 5: waiting for port 10100`); it is wiped
before every log record, so log lines are never mixed into it, and erased for good once
every worker has settled. Without a terminal (journald, a container log) each worker on its
way up gets a log line every `LOG_INTERVAL_S` instead: what it waits for, for how long, and
the last line of its own output.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TextIO

import trio

log = logging.getLogger("dsrouter.launcher")

REDRAW_INTERVAL_S = 0.5
LOG_INTERVAL_S = 15.0
"""How often, without a terminal, a worker on its way up is logged: often enough to show
the router is alive, rarely enough for minutes of model loading to stay readable."""
SETTLED = frozenset({"ready", "failed", "stopped"})
DIED = frozenset({"backoff", "failed"})
"""States a worker enters when its process ended without being asked to."""
_CLEAR = "\r\x1b[K"


class Progress:
    """The supervisor state of every worker, as the operator sees it.

    States: starting, ready, backoff, failed, stopped (what `/workers` shows as
    `managed_workers[].state`, and as `supervisor.state` of a registered worker), and "new"
    before a worker's first start. The detail says what a worker in progress waits for.
    """

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        last_output: Callable[[int], str | None] = lambda index: None,
    ) -> None:
        self.states = ["new"] * total
        self.details = [""] * total
        self.since = [trio.current_time()] * total
        self._stream = stream if stream is not None else sys.stderr
        self._last_output = last_output
        """The last line worker `index` wrote (None before its first)."""
        self._shown = False
        self._clear_filter = _ClearLine(self)

    def set_state(self, index: int, state: str, detail: str = "") -> None:
        """Record a state change of worker `index` and log it (one line per change)."""
        previous = self.states[index]
        self.states[index] = state
        self.details[index] = detail
        if previous != state:
            self.since[index] = trio.current_time()
            level = logging.WARNING if state in DIED else logging.INFO
            change = state if previous == "new" else f"{previous} -> {state}"
            log.log(level, "worker %d: %s%s", index, change, f" ({detail})" if detail else "")
        if self._shown and self.settled():
            self.erase()

    def set_detail(self, index: int, detail: str) -> None:
        """What a worker in progress is waiting for right now (no log line)."""
        self.details[index] = detail

    def settled(self) -> bool:
        return all(state in SETTLED for state in self.states)

    def summary(self) -> str:
        """`3/8 ready · 41 s · worker 5: waiting for port 10100`."""
        ready = sum(state == "ready" for state in self.states)
        parts = [f"{ready}/{len(self.states)} ready"]
        busy = [i for i, state in enumerate(self.states) if state not in SETTLED]
        if busy:
            elapsed = trio.current_time() - min(self.since[i] for i in busy)
            parts.append(f"{elapsed:.0f} s")
            first = busy[0]
            parts.append(f"worker {first}: {self.details[first] or self.states[first]}")
        failed = sum(state == "failed" for state in self.states)
        if failed:
            parts.append(f"{failed} failed")
        return " · ".join(parts)

    def log_waiting(self) -> None:
        """One line per worker on its way up: what it waits for, how long, its last output."""
        now = trio.current_time()
        for index, state in enumerate(self.states):
            if state in SETTLED or state == "new":
                continue
            line = self._last_output(index)
            log.info(
                "worker %d: %s for %.0f s: %s%s",
                index,
                state,
                now - self.since[index],
                self.details[index] or state,
                f"; last output: {line}" if line else "",
            )

    async def run(self) -> None:
        """Show progress until cancelled: the live summary on a terminal, else log lines."""
        if not self._stream.isatty():
            while True:
                await trio.sleep(LOG_INTERVAL_S)
                self.log_waiting()
        handlers = logging.getLogger().handlers
        for handler in handlers:
            handler.addFilter(self._clear_filter)
        try:
            while True:
                if not self.settled():
                    self._stream.write(_CLEAR + self.summary())
                    self._stream.flush()
                    self._shown = True
                await trio.sleep(REDRAW_INTERVAL_S)
        finally:
            for handler in handlers:
                handler.removeFilter(self._clear_filter)
            self.erase()

    def erase(self) -> None:
        if self._shown:
            self._shown = False
            self._stream.write(_CLEAR)
            self._stream.flush()


class _ClearLine(logging.Filter):
    """Wipes the live summary just before a log record is written over it."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.erase()
        return True
