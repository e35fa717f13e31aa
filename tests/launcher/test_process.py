"""One worker process: the parent-death signal, group kill, exit descriptions."""

from __future__ import annotations

import signal
import sys

import trio

from dsrouter.launcher.process import describe_exit, spawn
from tests.launcher.helpers import alive, wait_dead

SPAWNER = """
import os, sys, trio
from dsrouter.launcher.process import spawn

async def main():
    child = spawn(["sleep", "3600"], dict(os.environ))
    print(child.pid, flush=True)
    await trio.sleep_forever()

trio.run(main)
"""


async def test_a_worker_dies_when_the_process_that_spawned_it_is_sigkilled() -> None:
    with trio.fail_after(20):
        spawner = await trio.lowlevel.open_process([sys.executable, "-c", SPAWNER], stdout=-1)
        try:
            assert spawner.stdout is not None
            first = b""
            while not first.endswith(b"\n"):
                first += await spawner.stdout.receive_some(64)
            worker = int(first)
            assert alive(worker)
        finally:
            spawner.kill()
            await spawner.wait()
            await spawner.stdout.aclose()  # type: ignore[union-attr]
        await wait_dead([worker])


async def test_stop_terminates_the_whole_group_and_reports_the_signal() -> None:
    with trio.fail_after(20):
        child = spawn(["sh", "-c", "sleep 3600 & echo $!; wait"], {"PATH": "/usr/bin:/bin"})
        try:
            line = b""
            while not line.endswith(b"\n"):
                line += await child.output.receive_some(64)
            grandchild = int(line)
            assert await child.stop(timeout_s=5) == -signal.SIGTERM
            await wait_dead([child.pid, grandchild])
        finally:
            child.kill_group(signal.SIGKILL)  # only if the test failed: the group is gone
            await child.wait()
            child.output.close()


def test_exit_descriptions() -> None:
    assert describe_exit(0) == "exit status 0"
    assert describe_exit(3) == "exit status 3"
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(None) == "still running"
