"""One worker process in its own process group: spawn, wait, stop. Linux only.

Three guarantees, each kept here and nowhere else:

* **The worker dies with the router.** The direct child arms `PR_SET_PDEATHSIG = SIGKILL`
  before exec. The kernel sends that signal when the *thread* that forked the child exits,
  so the spawn runs on the trio thread (which lives as long as the router) and never in a
  `trio.to_thread` worker: those idle out after 10 s and would take the worker with them.
  That is also why this module does not use `trio.lowlevel.open_process`.
* **A group never outlives its leader.** When the leader exits, its pid stays reserved
  until it is reaped, so the group id cannot have been reused yet; `wait` SIGKILLs whatever
  is left in the group at that moment, then reaps the leader.
* **Stopping is bounded.** `stop` sends SIGTERM to the group, waits `timeout_s`, then
  SIGKILL, and gives up (with an error in the log) if even that does not end the leader.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence

import trio

log = logging.getLogger("dsrouter.launcher")

PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl
"""Resolved in the parent: the child must not run the dynamic loader between fork and exec."""
KILL_GRACE_S = 10.0
"""After SIGKILL, how long to wait for the leader before reporting it as unkillable."""


def _die_with(parent_pid: int) -> Callable[[], None]:
    def arm() -> None:
        """Runs in the child between fork and exec: no imports, no locks."""
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the router died before the signal was armed
            os._exit(1)

    return arm


class Child:
    """A spawned worker process; it leads its own process group (`pid == pgid`).

    `wait` may only be awaited by one task at a time (it waits on the pidfd).
    """

    def __init__(self, popen: subprocess.Popen[bytes], output: trio.lowlevel.FdStream) -> None:
        self._popen = popen
        self.pid = popen.pid
        self.output = output
        """The read end of the child's stdout+stderr pipe."""
        self._pidfd: int | None = os.pidfd_open(popen.pid)

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    async def wait(self) -> int:
        """Wait for the leader to exit, kill what is left of its group, reap it."""
        if self._pidfd is not None:
            await trio.lowlevel.wait_readable(self._pidfd)
            self.kill_group(signal.SIGKILL)
            trio.lowlevel.notify_closing(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = None
            self._popen.wait()
        code = self._popen.returncode
        assert code is not None
        return code

    def kill_group(self, sig: int) -> None:
        """Signal the whole group; a group that is already gone is not an error."""
        if self._pidfd is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, sig)

    async def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the group, SIGKILL it after `timeout_s`; the exit status, None if stuck."""
        if self._pidfd is not None:
            self.kill_group(signal.SIGTERM)
            with trio.move_on_after(timeout_s):
                return await self.wait()
            log.warning("pid %d did not stop within %gs of SIGTERM: SIGKILL", self.pid, timeout_s)
            self.kill_group(signal.SIGKILL)
            with trio.move_on_after(KILL_GRACE_S):
                return await self.wait()
            log.error(
                "pid %d survived SIGKILL for %gs (stuck in the kernel?); giving up on it",
                self.pid,
                KILL_GRACE_S,
            )
            return None
        return self.returncode


def spawn(argv: Sequence[str], env: Mapping[str, str]) -> Child:
    """Start `argv` in a new session with stdout and stderr on one pipe.

    Raises `OSError` (FileNotFoundError for a missing command) from the exec, synchronously.
    """
    read_end, write_end = os.pipe()
    try:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=write_end,
            start_new_session=True,
            preexec_fn=_die_with(os.getpid()),
        )
    except BaseException:
        os.close(read_end)
        raise
    finally:
        os.close(write_end)
    return Child(popen, trio.lowlevel.FdStream(read_end))


def describe_exit(code: int | None) -> str:
    """`exit status 3`, `killed by SIGKILL`, or `still running` for the log and errors."""
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
