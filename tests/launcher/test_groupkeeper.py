"""The group keeper (`dsrouter.launcher.groupkeeper`), the Ray actor's way to end a server's
whole process group: real processes, no Ray.

A stand-in parent starts the keeper as the Ray actor does; the "server" starts a
grandchild in its own group and both ignore SIGTERM, so only the keeper's SIGKILL after
`STOP_TIMEOUT_S` ends them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import trio

from tests.launcher.helpers import alive, wait_dead

STOP_TIMEOUT_S = 0.5
SERVER = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
print(child.pid, flush=True)
time.sleep(600)
"""
PARENT = f"""
import os, subprocess, sys
read, write = os.pipe()
keeper = subprocess.Popen(
    [sys.executable, "-m", "dsrouter.launcher.groupkeeper", "{STOP_TIMEOUT_S}", str(write),
     "--", sys.executable, "-c", {SERVER!r}],
    env={{**os.environ, "DSROUTER_KEEPER_PARENT": str(os.getpid())}},
    pass_fds=(write,),
    start_new_session=True,
)
os.close(write)
print(keeper.pid, os.read(read, 100).decode().strip(), flush=True)
print(keeper.wait(), flush=True)
"""


def _start_parent() -> tuple[subprocess.Popen[str], list[int]]:
    """The stand-in actor, and the pids of the keeper, the server and the grandchild."""
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    keeper, server = (int(pid) for pid in parent.stdout.readline().split())
    grandchild = int(parent.stdout.readline())
    return parent, [keeper, server, grandchild]


async def test_the_servers_whole_group_dies_with_the_keepers_parent() -> None:
    parent, pids = _start_parent()
    try:
        assert all(alive(pid) for pid in pids)
        with trio.fail_after(20):
            parent.kill()
            await wait_dead(pids)
    finally:
        _end(parent)


async def test_sigterm_to_the_keeper_ends_the_group_and_reports_the_kill() -> None:
    parent, (keeper, server, grandchild) = _start_parent()
    try:
        with trio.fail_after(20):
            os.kill(keeper, signal.SIGTERM)
            await wait_dead([server, grandchild])
            assert parent.stdout is not None
            status = await trio.to_thread.run_sync(parent.stdout.readline)
        assert int(status) == 128 + signal.SIGKILL  # SIGTERM was ignored: SIGKILL after 0.5 s
    finally:
        _end(parent)


def _end(parent: subprocess.Popen[str]) -> None:
    parent.kill()
    parent.wait()
    assert parent.stdout is not None
    parent.stdout.close()
