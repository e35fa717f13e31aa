"""A router inside another Python program, as Miles runs its router inside its own process.

From trio, `open_router` runs the router in the caller's nursery tree:

    async with open_router(port=0, worker_urls=["http://127.0.0.1:10090"]) as router:
        ...  # router.url answers; leaving the block stops it

From asyncio or plain code, `RouterThread` runs it on its own trio loop in a thread:

    router = RouterThread(port=0, worker_urls=[...])
    url = router.start()          # asyncio: await asyncio.to_thread(router.start)
    ...
    router.stop()

Either takes a `Config`, or the keyword arguments of `Overrides` (the `dsrouter run` flags:
`host`, `port`, `worker_urls`, `launcher_config`, ...) with an optional `config_file`. Signals
stay with the host program: an embedded router is stopped by leaving the block or `stop()`,
and reloaded through `POST /admin/reload`. Logging is the host's to set up too.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import attrs
import trio

from dsrouter.config import Config, Overrides, load
from dsrouter.daemon import run_router

__all__ = ["RouterThread", "RunningRouter", "open_router"]


@attrs.frozen
class RunningRouter:
    binds: list[str]
    """Every address the router listens on, as URLs (`http://127.0.0.1:30080`)."""

    @property
    def url(self) -> str:
        return self.binds[0]


def _config(config: Config | None, config_file: Path | None, flags: dict[str, Any]) -> Config:
    """`config` as given, else the file and flags loaded as `dsrouter run` loads them."""
    if config is not None:
        if config_file is not None or flags:
            raise TypeError("pass either a Config or config_file/flags, not both")
        return config
    return load(config_file, Overrides(**flags)).config


@asynccontextmanager
async def open_router(
    config: Config | None = None,
    *,
    config_file: Path | None = None,
    span_exporter: Any = None,
    **flags: Any,
) -> AsyncIterator[RunningRouter]:
    """Run a router while the block runs; it listens (and its launched workers are ready)
    when the block starts. Leaving the block stops it, launched workers included.

    `span_exporter`, an OpenTelemetry `SpanExporter`, receives the router's spans (each as
    it ends) instead of `[tracing] endpoint`: a host that has its own exporter uses it."""
    effective = _config(config, config_file, flags)
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            functools.partial(
                run_router, effective, handle_signals=False, span_exporter=span_exporter
            )
        )
        try:
            yield RunningRouter(binds)
        finally:
            nursery.cancel_scope.cancel()


class RouterThread:
    """A router on its own trio loop in a daemon thread, for hosts that are not trio."""

    def __init__(
        self, config: Config | None = None, *, config_file: Path | None = None, **flags: Any
    ) -> None:
        self.config = _config(config, config_file, flags)
        self.url: str | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout_s: float = 900.0) -> str:
        """Start the router and return its URL once it listens. The default timeout
        covers a launcher waiting for its workers to load their models."""
        if self._thread is not None:
            raise RuntimeError("this RouterThread was started already")
        self._thread = threading.Thread(target=self._run, name="dsrouter", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            self.stop()
            raise TimeoutError(f"the router did not start within {timeout_s:g}s")
        if self._error is not None:
            raise self._error
        assert self.url is not None
        return self.url

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the router (and its launched workers) and wait for the thread to end."""
        if self._thread is None:
            return
        if self._token is not None and self._stop is not None:
            with suppress(trio.RunFinishedError):  # it ended by itself
                self._token.run_sync_soon(self._stop.set)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the router did not stop within {timeout_s:g}s")

    def __enter__(self) -> RouterThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with open_router(self.config) as router:
            self.url = router.url
            self._ready.set()
            await self._stop.wait()
