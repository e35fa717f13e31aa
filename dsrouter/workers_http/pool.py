"""The proxy's HTTP/1.1 client: keep-alive pools per worker on trio streams + h11.

Why not httpx here: STACK_NOTES.md §9 measured httpx/httpcore's pool re-scanning every
connection on every request (quadratic under concurrency); on the proxy hot path a small
pool on h11 carried 2-3x the requests per CPU-second. httpx stays for probes and control
broadcasts, where convenience matters more than microseconds.

The interface is deliberately small: `Upstream.send()` returns an `UpstreamResponse` whose
body is read with `aiter_raw()` and which must be `aclose()`d. A connection goes back to its
pool only after a complete exchange; anything else (cancellation, early close, error)
closes it, so a half-read answer can never be mistaken for the next one.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import attrs
import h11
import trio

log = logging.getLogger("dsrouter.workers_http")

READ_SIZE = 256 * 1024
COALESCE_LIMIT = 64 * 1024
"""Bodies up to this size are written together with the request head (one syscall)."""
Headers = list[tuple[bytes, bytes]]


class UpstreamError(Exception):
    """The exchange with the worker failed. `sent_nothing` means retrying is safe."""

    def __init__(self, message: str, *, connect: bool = False, sent_nothing: bool = False) -> None:
        super().__init__(message)
        self.connect = connect
        self.sent_nothing = sent_nothing


class InvalidRequest(Exception):
    """The request head cannot be sent as HTTP/1.1 (the client's fault, not the worker's)."""


@attrs.define(eq=False)
class _Connection:
    stream: trio.abc.Stream
    h11: h11.Connection
    idle_since: float = 0.0
    reused: bool = False

    @property
    def socket(self) -> trio.socket.SocketType:
        stream = self.stream
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        return stream.socket

    def looks_alive(self) -> bool:
        """An idle keep-alive socket that is readable was closed (or garbled) by the server."""
        return not self.socket.is_readable()

    def discard(self) -> None:
        """Close without awaiting: only for idle connections with nothing in flight."""
        self.socket.close()


@attrs.define(eq=False)
class UpstreamResponse:
    status_code: int
    headers: Headers
    _conn: _Connection
    _pool: _Pool
    _done: bool = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        conn = self._conn.h11
        while not self._done:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamError(f"worker broke its answer: {exc}") from None
            if event is h11.NEED_DATA:
                try:
                    data = await self._conn.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise UpstreamError(f"worker closed the connection: {exc}") from None
                try:
                    conn.receive_data(data)
                except h11.RemoteProtocolError as exc:
                    raise UpstreamError(f"invalid answer from worker: {exc}") from None
                continue
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
            elif isinstance(event, h11.ConnectionClosed):
                raise UpstreamError("worker closed the connection mid-answer")
            else:
                raise UpstreamError(f"unexpected event from worker: {event!r}")

    async def aclose(self) -> None:
        """Return the connection to the pool after a full exchange, else close it."""
        conn = self._conn
        if self._done and conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            conn.h11.start_next_cycle()
            self._pool.release(conn)
        else:
            await _close(conn)


async def _close(conn: _Connection) -> None:
    with trio.CancelScope(shield=True):
        await conn.stream.aclose()


async def _open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection; an IP address is dialled directly.

    `trio.open_tcp_stream` runs name resolution and a happy-eyeballs race in a nursery of
    its own, which for workers registered by address (the usual case) cost more CPU than
    the whole probe they were opened for.
    """
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


@attrs.define(eq=False)
class _Pool:
    host: str
    port: int
    tls: bool
    max_idle: int
    idle_expiry_s: float
    idle: deque[_Connection] = attrs.Factory(deque)

    def take(self) -> _Connection | None:
        now = trio.current_time()
        while self.idle:
            conn = self.idle.pop()
            if now - conn.idle_since < self.idle_expiry_s and conn.looks_alive():
                conn.reused = True
                return conn
            conn.discard()
        return None

    def sweep(self, now: float) -> None:
        """Close idle connections that expired or that the worker already closed."""
        keep = deque(
            conn
            for conn in self.idle
            if now - conn.idle_since < self.idle_expiry_s and conn.looks_alive()
        )
        for conn in self.idle:
            if conn not in keep:
                conn.discard()
        self.idle = keep

    def release_unused(self, conn: _Connection) -> None:
        """Return a connection nothing was sent on (its h11 state is still idle)."""
        if conn.h11.our_state is h11.IDLE:
            self.release(conn)
        else:
            conn.discard()

    def release(self, conn: _Connection) -> None:
        if len(self.idle) >= self.max_idle:
            conn.discard()
            return
        conn.idle_since = trio.current_time()
        self.idle.append(conn)

    async def connect(self, timeout_s: float) -> _Connection:
        with trio.move_on_after(timeout_s) as scope:
            try:
                stream: trio.abc.Stream = await _open_tcp(self.host, self.port)
            except OSError as exc:
                raise UpstreamError(
                    f"connect to {self.host}:{self.port} failed: {exc}",
                    connect=True,
                    sent_nothing=True,
                ) from None
            except UnicodeError as exc:
                # The resolver IDNA-encodes the host: a name that cannot be encoded would
                # otherwise raise out of whichever task dialled (a probe ended the process).
                # `normalize_worker_url` refuses such names, so say so loudly.
                log.error("worker host %r cannot be IDNA-encoded: %s", self.host, exc)
                raise UpstreamError(
                    f"connect to {self.host}:{self.port} failed: host name cannot be "
                    f"IDNA-encoded: {exc}",
                    connect=True,
                    sent_nothing=True,
                ) from None
            if self.tls:
                stream = trio.SSLStream(
                    stream, ssl.create_default_context(), server_hostname=self.host
                )
        if scope.cancelled_caught:
            raise UpstreamError(
                f"connect to {self.host}:{self.port} timed out after {timeout_s:g}s",
                connect=True,
                sent_nothing=True,
            )
        return _Connection(stream, h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20))


class Upstream:
    """Keep-alive connection pools, one per worker origin."""

    def __init__(
        self, *, connect_timeout_s: float, max_idle_per_worker: int = 64, idle_expiry_s: float = 4.0
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.max_idle = max_idle_per_worker
        self.idle_expiry_s = idle_expiry_s
        self._pools: dict[str, _Pool] = {}

    def _pool(self, origin: str) -> _Pool:
        pool = self._pools.get(origin)
        if pool is None:
            parts = urlsplit(origin)
            tls = parts.scheme == "https"
            pool = _Pool(
                parts.hostname or "",
                parts.port or (443 if tls else 80),
                tls,
                self.max_idle,
                self.idle_expiry_s,
            )
            self._pools[origin] = pool
        return pool

    async def send(
        self,
        method: str,
        origin: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send one request and return once the answer's head has arrived.

        A reused keep-alive connection that turns out dead before any answer byte is
        replaced by a fresh one once, as long as the body can be sent again.
        """
        pool = self._pool(origin)
        conn = pool.take()
        if conn is not None:
            try:
                return await self._exchange(pool, conn, method, origin, target, headers, body)
            except UpstreamError as exc:
                if not exc.sent_nothing:
                    raise
        conn = await pool.connect(self.connect_timeout_s)
        return await self._exchange(pool, conn, method, origin, target, headers, body)

    async def _exchange(
        self,
        pool: _Pool,
        conn: _Connection,
        method: str,
        origin: str,
        target: str,
        headers: Headers,
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        host = origin.split("://", 1)[1].encode()
        framing: Headers = []
        if isinstance(body, bytes):
            framing = [(b"content-length", str(len(body)).encode())]
        elif body is not None and not any(k == b"content-length" for k, _ in headers):
            framing = [(b"transfer-encoding", b"chunked")]
        try:
            request = h11.Request(
                method=method, target=target, headers=[(b"host", host), *headers, *framing]
            )
        except h11.LocalProtocolError as exc:
            pool.release_unused(conn)
            raise InvalidRequest(f"request cannot be forwarded: {exc}") from None
        body_started = False
        try:
            head = conn.h11.send(request)
            if body is None or (isinstance(body, bytes) and len(body) <= COALESCE_LIMIT):
                # One write for head, body and end: a small request costs one syscall.
                data = conn.h11.send(h11.Data(data=body)) if body else b""
                await conn.stream.send_all(head + data + conn.h11.send(h11.EndOfMessage()))
            else:
                await conn.stream.send_all(head)
                if isinstance(body, bytes):
                    await conn.stream.send_all(conn.h11.send(h11.Data(data=body)))
                else:
                    async for chunk in body:
                        body_started = True
                        await conn.stream.send_all(conn.h11.send(h11.Data(data=chunk)))
                end = conn.h11.send(h11.EndOfMessage())
                if end:
                    await conn.stream.send_all(end)
            while True:
                event = conn.h11.next_event()
                if event is h11.NEED_DATA:
                    data = await conn.stream.receive_some(READ_SIZE)
                    conn.h11.receive_data(data)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    return UpstreamResponse(event.status_code, list(event.headers), conn, pool)
                raise UpstreamError(
                    f"worker closed the connection before answering ({type(event).__name__})",
                    sent_nothing=conn.reused and not body_started,
                )
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            OSError,
            h11.LocalProtocolError,
            h11.RemoteProtocolError,
        ) as exc:
            await _close(conn)
            raise UpstreamError(
                f"exchange with worker failed: {type(exc).__name__}: {exc}",
                sent_nothing=conn.reused and not body_started,
            ) from None
        except BaseException:
            await _close(conn)
            raise

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sweep the idle pools so a burst's sockets are closed once it is over.

        Without this, connections the workers closed after their keep-alive timeout stay
        open on our side (CLOSE_WAIT) until the next request to that worker, which for a
        removed or quiet worker may be never. Cancelled (the router stops, or an embedded
        router's block ends), it closes the idle connections: nothing will reuse them.
        """
        task_status.started()
        try:
            while True:
                await trio.sleep(self.idle_expiry_s / 2)
                now = trio.current_time()
                for pool in self._pools.values():
                    pool.sweep(now)
        finally:
            self.close_idle()

    def close_idle(self) -> None:
        for pool in self._pools.values():
            while pool.idle:
                pool.idle.pop().discard()
