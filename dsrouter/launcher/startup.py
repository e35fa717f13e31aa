"""Bringing every slot of a pool up at once, for both backends (local and Ray).

A pool is started only when every worker's first start succeeds; the reasons of all that
failed, not just the first, go into the one `LaunchError` the operator reads.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio


class StartFailed(Exception):
    """A worker did not become ready during its first start (turned into a `LaunchError`)."""


def no_restart_metrics(worker: str) -> None:
    """Nothing counts restarts (tests, or a router without metrics)."""


async def start_all(pool: trio.Nursery, runs: Sequence[Callable[..., Awaitable[Any]]]) -> list[str]:
    """Start each of `runs` (a slot's `run(task_status=...)`) in `pool`, all in parallel.

    Returns the reasons of the slots whose first start failed, after cancelling `pool` (so
    the ones that did start are stopped); an empty list when every slot is up.
    """
    failures: list[str] = []
    try:
        async with trio.open_nursery() as starting:
            for run in runs:
                starting.start_soon(pool.start, run)
    except* StartFailed as group:
        pool.cancel_scope.cancel()
        failures = [str(exc) for exc in _leaves(group)]
    return failures


def _leaves(group: BaseExceptionGroup[StartFailed]) -> list[StartFailed]:
    found: list[StartFailed] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            found += _leaves(exc)
        else:
            found.append(exc)
    return found
