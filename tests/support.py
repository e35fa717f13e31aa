"""Helpers shared by the integration tests: real router processes on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import trio

START_TIMEOUT_S = 30.0


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket, at a path in `tmp_path`.

    (The abstract `@name` form is covered by tests/unit/test_notify.py.) Tests take it from
    the `notify` fixture, which closes it however the test ends.
    """

    def __init__(self, tmp_path: Path) -> None:
        self.name = str(tmp_path / "notify.sock")
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.messages: list[dict[str, str]] = []

    async def bind(self) -> None:
        await self.sock.bind(self.name)

    async def next_with(self, key: str, timeout_s: float = 20.0) -> dict[str, str]:
        with trio.fail_after(timeout_s):
            while True:
                data = await self.sock.recv(65536)
                fields = dict(line.split("=", 1) for line in data.decode().splitlines())
                self.messages.append(fields)
                if key in fields:
                    return fields


@attrs.define
class RouterProcess:
    process: trio.Process
    url: str
    output: list[str]
    workers: list[SimWorker] = attrs.Factory(list)
    """The simulated workers `routed_pool` started behind it, in `--worker-urls` order."""

    @property
    def pid(self) -> int:
        return self.process.pid

    async def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        """Send `sig` and wait for the exit status (SIGKILL if it outlives the timeout)."""
        if self.process.returncode is None:
            self.process.send_signal(sig)
        with trio.move_on_after(timeout_s):
            return await self.process.wait()
        self.process.kill()
        await self.process.wait()
        raise AssertionError(f"router pid {self.pid} did not stop within {timeout_s}s")


async def _pump(
    stream: trio.abc.ReceiveStream,
    lines: list[str],
    ready: trio.Event,
    marker: str,
    eof: trio.Event | None = None,
) -> None:
    buffer = b""
    async for chunk in stream:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for raw in complete:
            line = raw.decode(errors="replace")
            lines.append(line)
            if marker in line and not ready.is_set():
                ready.set()
    if eof is not None:
        eof.set()


@asynccontextmanager
async def router_process(
    args: list[str],
    *,
    config: str | None = None,
    tmp_path: Path | None = None,
    env: dict[str, str] | None = None,
    wait_ready: bool = True,
    start_timeout_s: float = START_TIMEOUT_S,
) -> AsyncIterator[RouterProcess]:
    """Run `dsrouter run ARGS` on 127.0.0.1 with an ephemeral port; stop it afterwards.

    Yields once the router says `dsrouter ready` (its launched workers are up), or with
    `wait_ready=False` as soon as it listens (the launcher may still be starting workers).
    """
    argv = [sys.executable, "-m", "dsrouter", "run", "--host", "127.0.0.1", "--port", "0", *args]
    if config is not None:
        assert tmp_path is not None
        path = tmp_path / "router.toml"
        path.write_text(config)
        argv += ["--config", str(path)]
    process = await trio.lowlevel.open_process(
        argv,
        stdout=-1,
        stderr=-2,
        env={**os.environ, **(env or {})},
    )
    lines: list[str] = []
    ready = trio.Event()
    eof = trio.Event()
    marker = "dsrouter ready: " if wait_ready else "dsrouter listening on "
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_pump, process.stdout, lines, ready, marker, eof)
        router = RouterProcess(process, "", lines)
        try:
            with trio.fail_after(start_timeout_s):
                await ready.wait()
            listening = next(line for line in lines if "dsrouter listening on " in line)
            if listening.startswith("{"):  # logging.format = "json"
                listening = json.loads(listening)["msg"]
            router.url = listening.split("dsrouter listening on ", 1)[1].strip()
            yield router
        finally:
            with trio.CancelScope(shield=True):
                if process.returncode is None:
                    await router.stop()
                with trio.move_on_after(5):  # the last lines, up to the router's exit
                    await eof.wait()
            nursery.cancel_scope.cancel()


@attrs.frozen
class Answer:
    """One request of a `Traffic` loop: when it ended, its status (0: no answer), its headers."""

    done_at: float
    status: int
    headers: httpx.Headers


@attrs.define
class Traffic:
    """Clients sending the same request back to back through the router until `stop()`.

    They stop between requests, never halfway through one: a request cancelled while httpx
    streams its body leaves an unclosed async generator behind (a ResourceWarning, which the
    suite treats as an error), and a cut request would count as lost although the router
    did nothing wrong.
    """

    path: str
    body: dict[str, object]
    answers: list[Answer] = attrs.Factory(list)
    _stop: trio.Event = attrs.Factory(trio.Event)

    async def client(self, http: httpx.AsyncClient, router: str) -> None:
        while not self._stop.is_set():
            try:
                response = await http.post(f"{router}{self.path}", json=self.body)
            except httpx.TransportError:
                self.answers.append(Answer(trio.current_time(), 0, httpx.Headers()))
            else:
                self.answers.append(
                    Answer(trio.current_time(), response.status_code, response.headers)
                )

    def stop(self) -> None:
        self._stop.set()

    @property
    def statuses(self) -> list[int]:
        return [a.status for a in self.answers]

    def after(self, moment: float) -> list[Answer]:
        return [a for a in self.answers if a.done_at > moment]


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout_s: float = 20.0, interval_s: float = 0.05
) -> None:
    """Poll `check` until it returns true; fail with a clear message at the deadline."""
    with trio.move_on_after(timeout_s):
        while not await check():  # noqa: ASYNC110 - polling another process, no event to wait on
            await trio.sleep(interval_s)
        return
    raise AssertionError(f"condition not met within {timeout_s}s")


async def worker_state(client: httpx.AsyncClient, router: str, worker_url: str) -> dict:
    response = await client.get(f"{router}/workers")
    for worker in response.json()["workers"]:
        if worker["url"] == worker_url:
            return worker
    raise AssertionError(f"{worker_url} is not registered")


def free_port() -> int:
    """A port that was free a moment ago (the kernel's choice for an ephemeral bind)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@attrs.define
class SimWorker:
    process: trio.Process
    port: int
    args: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


async def start_simworker(
    nursery: trio.Nursery, *args: str, port: int | None = None, wait_listening: bool = True
) -> SimWorker:
    """Start `python -m dsrouter.simworker` on 127.0.0.1; killed when `nursery` is cancelled."""
    port = port or free_port()
    argv = [
        sys.executable,
        "-m",
        "dsrouter.simworker",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *args,
    ]
    process = await trio.lowlevel.open_process(argv, stdout=-1, stderr=-2)
    worker = SimWorker(process, port, list(args))
    lines: list[str] = []
    ready = trio.Event()

    async def pump_and_reap() -> None:
        try:
            await _pump(process.stdout, lines, ready, "simworker listening on")
        finally:
            with trio.CancelScope(shield=True):
                await worker.kill()

    nursery.start_soon(pump_and_reap)
    if wait_listening:
        with trio.fail_after(START_TIMEOUT_S):
            await ready.wait()
    return worker


async def healthy(http: httpx.AsyncClient, router: str, count: int) -> None:
    """Wait until `count` workers are healthy with their model known (probed at least once)."""

    async def check() -> bool:
        workers = (await http.get(f"{router}/workers")).json()["workers"]
        return sum(w["state"] == "healthy" and w["model"] is not None for w in workers) == count

    await wait_until(check)


@asynccontextmanager
async def routed_pool(
    http: httpx.AsyncClient,
    tmp_path: Path,
    *workers: Sequence[str],
    args: Sequence[str] = (),
    config: str | None = None,
    env: dict[str, str] | None = None,
) -> AsyncIterator[RouterProcess]:
    """Simulated workers (one per argument list) behind a router process, all healthy.

    The set-up most tests share: the workers are in the router's `workers`, killed (and the
    router stopped) on exit.
    """
    async with trio.open_nursery() as nursery:
        started = [await start_simworker(nursery, *spec) for spec in workers]
        argv = ["--worker-urls", *[w.url for w in started], *args]
        async with router_process(argv, config=config, tmp_path=tmp_path, env=env) as router:
            router.workers = started
            await healthy(http, router.url, len(started))
            yield router
        nursery.cancel_scope.cancel()


@attrs.frozen
class RawAnswer:
    status: int
    headers: dict[str, str]
    """Lower-case names; a repeated header keeps its last value."""
    body: bytes

    def json(self) -> object:
        import json

        return json.loads(self.body)


async def raw_request(
    url: str, data: bytes | list[bytes], *, pause_s: float = 0.0, timeout_s: float = 20.0
) -> RawAnswer:
    """Send `data` exactly as given (a malformed head, an absolute-form target...) to
    `url`'s host and port, read until the server closes, and parse the one answer.

    `data` as a list is sent piece by piece, `pause_s` apart. The request should say
    `Connection: close` (or be one the server closes on).
    """
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    assert parts.hostname in ("127.0.0.1", "::1", "localhost"), "loopback only"
    pieces = [data] if isinstance(data, bytes) else data
    received = b""
    with trio.fail_after(timeout_s):
        stream = await trio.open_tcp_stream(parts.hostname, parts.port or 80)
        async with stream:
            for index, piece in enumerate(pieces):
                if index and pause_s:
                    await trio.sleep(pause_s)
                try:
                    await stream.send_all(piece)
                except trio.BrokenResourceError:
                    break  # the server answered and closed before reading everything
            try:
                while chunk := await stream.receive_some(65536):
                    received += chunk
            except trio.BrokenResourceError:
                pass  # a reset after the answer (the server closed with our data unread)
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            if not size:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2 :]
        body = decoded
    return RawAnswer(int(status_line.split(" ")[1]), headers, body)
