"""`python -m dsrouter.launcher.groupkeeper STOP_TIMEOUT_S PID_FD -- ARGV...`

Runs ARGV as the leader of a new process group and ends that whole group, SIGTERM then
SIGKILL after STOP_TIMEOUT_S, when it is asked to (SIGTERM or SIGINT) or when its own parent
dies. The Ray backend's actor (`ray_actor.py`) starts every server through it, because an
actor can die in ways no code of its own sees (`ray.kill`, an OOM kill, a lost node): a
parent-death signal on the server alone would end only the group's leader, and the server's
children, in a group of their own away from the actor's, would escape Ray's per-worker
process-group cleanup and keep their GPUs. The keeper is that missing survivor: it arms
`PR_SET_PDEATHSIG = SIGTERM` for itself, so the actor's death reaches it as a stop request.

The server's pid is written to PID_FD (then closed) as soon as it exists. The keeper exits
with the server's status, or 128 + N when the server was killed by signal N (as a shell
reports it). If the keeper itself is SIGKILLed, the server leader still dies (its own
parent-death signal is SIGKILL); what remains of its group is then left to Ray's subreaper
(README: "A pool on a Ray cluster").
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
KILL_GRACE_S = 10.0
"""After SIGKILL, how long to wait for the leader before reaping it anyway."""
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _arm_kill_with_keeper() -> None:
    """Runs in the server between fork and exec: it dies with the keeper, whatever kills it."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _exited(pidfd: int, timeout_s: float | None) -> bool:
    return bool(select.select([pidfd], [], [], timeout_s)[0])


def keep(argv: list[str], stop_timeout_s: float, pid_fd: int, parent: int) -> int:
    """Run `argv` until it exits or the keeper is told to stop; the status to exit with."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the signal was armed
        return 1
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)  # the wakeup fd carries it to the select below
    server = subprocess.Popen(argv, process_group=0, preexec_fn=_arm_kill_with_keeper)
    os.write(pid_fd, f"{server.pid}\n".encode())
    os.close(pid_fd)
    pidfd = os.pidfd_open(server.pid)
    ready = select.select([pidfd, wake_read], [], [])[0]
    if pidfd not in ready:
        _signal_group(server.pid, signal.SIGTERM)
        if not _exited(pidfd, stop_timeout_s):
            print(
                f"groupkeeper: pid {server.pid} still runs {stop_timeout_s:g} s after SIGTERM: "
                "SIGKILL",
                file=sys.stderr,
                flush=True,
            )
            _signal_group(server.pid, signal.SIGKILL)
            _exited(pidfd, KILL_GRACE_S)
    # The leader has exited but is not reaped, so its group id cannot be reused yet.
    _signal_group(server.pid, signal.SIGKILL)
    code = server.wait()
    return code if code >= 0 else 128 - code


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def main() -> None:
    timeout, pid_fd, separator, *argv = sys.argv[1:]
    if separator != "--" or not argv:
        sys.exit("usage: python -m dsrouter.launcher.groupkeeper STOP_TIMEOUT_S PID_FD -- ARGV...")
    sys.exit(keep(argv, float(timeout), int(pid_fd), int(os.environ["DSROUTER_KEEPER_PARENT"])))


if __name__ == "__main__":
    main()
