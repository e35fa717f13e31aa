"""One call per worker, concurrently, each bounded by the same deadline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import trio

T = TypeVar("T")
R = TypeVar("R")


async def fan_out(
    items: Sequence[T],
    call: Callable[[T], Awaitable[R]],
    timeout_s: float,
    *,
    enough: Callable[[R], bool] | None = None,
) -> list[R | None]:
    """`call(item)` for every item at once; results in input order, None where the call
    did not finish within `timeout_s`.

    `enough` ends the whole fan-out as soon as one result satisfies it (an owner lookup
    needs one yes, not every answer); calls still running then are cancelled (None).
    A slow worker never delays another's answer past the deadline.
    """
    results: list[R | None] = [None] * len(items)

    async def run(index: int, item: T, nursery: trio.Nursery) -> None:
        with trio.move_on_after(timeout_s):
            result = results[index] = await call(item)
            if enough is not None and enough(result):
                nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        for index, item in enumerate(items):
            nursery.start_soon(run, index, item, nursery)
    return results
