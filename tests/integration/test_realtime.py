"""Realtime WebSocket sessions and job events through a real router to simulated workers.

The client side is a real WebSocket client (trio-websocket); what the worker received and
sent is read from the simulated worker's own record (`/_sim/state`), not the router's.
"""

from __future__ import annotations

import hashlib
import json
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgpack
import trio
from trio_websocket import (
    ConnectionClosed,
    WebSocketConnection,
    open_websocket_url,
)

from dsrouter.workers_http.websocket import close_socket
from tests.support import (
    RawAnswer,
    healthy,
    raw_request,
    routed_pool,
    router_process,
    start_simworker,
    wait_until,
)

PATH = "/v1/realtime_video/generate"
KEY = "rt-key"
CONFIG = f"""
[health]
interval_s = 0.3
timeout_s = 2.0

[security]
api_keys = ["{KEY}"]
"""
AUTH = [("Authorization", f"Bearer {KEY}")]
VIDEO = ("--task-type", "T2V", "--sec-per-mpx-step", "0")
SESSION_TIMEOUT_S = 20.0


def ws_url(router: str, path: str = PATH) -> str:
    return router.replace("http://", "ws://", 1) + path


@asynccontextmanager
async def session(router: str, path: str = PATH) -> AsyncIterator[WebSocketConnection]:
    async with open_websocket_url(
        ws_url(router, path), extra_headers=AUTH, max_message_size=16 * 2**20
    ) as ws:
        try:
            yield ws
        finally:
            await close_socket(ws)  # trio-websocket leaves it open when the router closes


async def until_closed(ws: WebSocketConnection) -> tuple[list[bytes | str], int, str]:
    """Every message until the router closes; then the close code and reason."""
    messages: list[bytes | str] = []
    with trio.fail_after(SESSION_TIMEOUT_S):
        while True:
            try:
                messages.append(await ws.get_message())
            except ConnectionClosed as closed:
                assert closed.reason is not None
                return messages, closed.reason.code, closed.reason.reason or ""


async def upgrade_without_websocket_client(
    router: str, headers: list[tuple[str, str]]
) -> RawAnswer:
    """An upgrade the router refuses, sent raw: trio-websocket's client leaves its socket
    open when an upgrade is refused (closed only by the garbage collector)."""
    head = [
        f"GET {PATH} HTTP/1.1",
        "Host: router",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers),
    ]
    return await raw_request(router, ("\r\n".join(head) + "\r\n\r\n").encode())


def decode(messages: list[bytes | str]) -> list[Any]:
    """Unpack msgpack messages; the binary frame after a `frame_batch_header` is raw."""
    decoded: list[Any] = []
    for message in messages:
        assert isinstance(message, bytes), "the worker sends binary frames only"
        after_header = decoded and isinstance(decoded[-1], dict)
        if after_header and decoded[-1]["type"] == "frame_batch_header":
            decoded.append(message)
        else:
            decoded.append(msgpack.unpackb(message))
    return decoded


def digest(message: bytes | str) -> str:
    data = message.encode() if isinstance(message, str) else message
    return hashlib.sha256(data).hexdigest()


async def sim_realtime(http: httpx.AsyncClient, worker_url: str) -> dict[str, Any]:
    return (await http.get(f"{worker_url}/_sim/state")).json()["realtime"]


async def sessions_by_worker(http: httpx.AsyncClient, router: str) -> dict[str, int]:
    workers = (await http.get(f"{router}/workers")).json()["workers"]
    return {w["url"]: w["realtime_sessions"] for w in workers}


async def test_a_session_relays_every_message_unchanged_both_ways(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *VIDEO)
        async with router_process(
            ["--worker-urls", worker.url], config=CONFIG, tmp_path=tmp_path
        ) as router:
            await healthy(http, router.url, 1)
            refused = await upgrade_without_websocket_client(router.url, [])
            assert refused.status == 401

            init = {"type": "init", "prompt": "a fox", "size": "320x240", "max_chunks": 2}
            sent: list[bytes | str] = [
                "not msgpack",
                msgpack.packb({"type": "init"}),
                msgpack.packb(init),
                msgpack.packb(
                    {"type": "event", "kind": "camera", "payload": [1, 2], "event_id": 7}
                ),
            ]
            async with session(router.url) as ws:
                for message in sent:
                    await ws.send_message(message)
                received, code, reason = await until_closed(ws)
            assert (code, reason) == (1000, "generation complete")
            decoded = decode(received)
            error = {"type": "error", "content": "invalid generate request"}
            assert decoded[:2] == [error, error]
            kinds = [m["type"] if isinstance(m, dict) else len(m) for m in decoded[2:]]
            # 320x240 raw frames are large: every batch is a header, then a raw binary frame.
            batch = 320 * 240 * 3 * 2
            assert kinds == (["frame_batch_header", batch] * 2 + ["chunk_stats"]) * 2
            record = await sim_realtime(http, worker.url)
            assert record["received_sha256"] == [digest(m) for m in sent]
            assert record["sent_sha256"] == [digest(m) for m in received]

            # The client's close code and reason reach the worker.
            async with session(router.url) as ws:
                await ws.send_message(msgpack.packb({"type": "init", "prompt": "x", "size": "8x8"}))
                await ws.get_message()
                await ws.aclose(4001, "client done")
            await wait_until(
                lambda: _client_close_is(http, worker.url, [4001, "client done"]), timeout_s=10
            )
            metrics = (await http.get(f"{router.url}/metrics")).text
            assert f'dsrouter_realtime_sessions_total{{code="1000",route="{PATH}"}} 1.0' in metrics
            assert "dsrouter_realtime_session_duration_seconds_count" in metrics
        lines = [line for line in router.output if " WEBSOCKET " in line]
        assert len(lines) == 2, lines
        assert "close=1000" in lines[0] and "frames_in=4" in lines[0]
        assert "close=4001" in lines[1]
        nursery.cancel_scope.cancel()


async def _client_close_is(http: httpx.AsyncClient, worker_url: str, expected: list) -> bool:
    return (await sim_realtime(http, worker_url))["client_close"] == expected


async def test_two_sessions_take_two_workers_and_a_third_gets_the_refusal(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[VIDEO] * 2, config=CONFIG) as router:
        workers = router.workers
        async with session(router.url), session(router.url) as second:
            await wait_until(lambda: _sessions_are(http, router.url, {w.url: 1 for w in workers}))
            async with session(router.url) as third:
                messages, code, reason = await until_closed(third)
            busy = "another realtime session is already active on every worker"
            assert [msgpack.unpackb(m) for m in messages] == [{"type": "error", "content": busy}]
            assert (code, reason) == (1008, busy)
            await second.aclose()
            await wait_until(lambda: _sessions_total_is(http, router.url, 1))
            # The slot is free again: a new session gets a worker, and it generates.
            async with session(router.url) as fourth:
                init = {"type": "init", "prompt": "x", "size": "8x8", "max_chunks": 1}
                await fourth.send_message(msgpack.packb(init))
                _, code, _ = await until_closed(fourth)
                assert code == 1000


async def _sessions_total_is(http: httpx.AsyncClient, router: str, expected: int) -> bool:
    return sum((await sessions_by_worker(http, router)).values()) == expected


async def _sessions_are(http: httpx.AsyncClient, router: str, expected: dict[str, int]) -> bool:
    return await sessions_by_worker(http, router) == expected


async def test_when_busy_wait_gives_the_next_free_worker(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = CONFIG + '\n[realtime]\nwhen_busy = "wait"\nwait_s = 20.0\n'
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *VIDEO)
        async with router_process(
            ["--worker-urls", worker.url], config=config, tmp_path=tmp_path
        ) as router:
            await healthy(http, router.url, 1)
            first_closed = trio.Event()

            async def hold_then_leave() -> None:
                async with session(router.url) as first:
                    await wait_until(lambda: _sessions_are(http, router.url, {worker.url: 1}))
                    nursery.start_soon(waiting_session)
                    await wait_until(lambda: _router_waits(http, router.url))
                    await first.aclose()
                first_closed.set()

            async def waiting_session() -> None:
                async with session(router.url) as second:
                    init = {"type": "init", "prompt": "x", "size": "8x8", "max_chunks": 1}
                    await second.send_message(msgpack.packb(init))
                    _, code, _ = await until_closed(second)
                    assert code == 1000
                    assert first_closed.is_set()
                done.set()

            done = trio.Event()
            nursery.start_soon(hold_then_leave)
            with trio.fail_after(SESSION_TIMEOUT_S):
                await done.wait()
        nursery.cancel_scope.cancel()


async def _router_waits(http: httpx.AsyncClient, router: str) -> bool:
    """An upgrade is waiting for a slot: its connection is open and counted in flight."""
    metrics = (await http.get(f"{router}/metrics")).text
    return "dsrouter_realtime_upgrades_waiting 1.0" in metrics


async def test_killing_the_worker_closes_the_session_with_1011(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, VIDEO, config=CONFIG) as router:
        [worker] = router.workers
        async with session(router.url) as ws:
            await wait_until(lambda: _sessions_are(http, router.url, {worker.url: 1}))
            await worker.kill()
            _, code, reason = await until_closed(ws)
        assert code == 1011 and "connection lost" in reason
        await wait_until(lambda: _sessions_are(http, router.url, {worker.url: 0}))


async def test_idle_sessions_are_closed_with_1001(tmp_path: Path, http: httpx.AsyncClient) -> None:
    config = CONFIG + "\n[realtime]\nidle_timeout_s = 0.5\n"
    async with routed_pool(http, tmp_path, VIDEO, config=config) as router:
        [worker] = router.workers
        async with session(router.url) as ws:
            _, code, reason = await until_closed(ws)
        assert code == 1001 and "idle_timeout_s" in reason
        await wait_until(lambda: _client_close_is(http, worker.url, [1001, reason]))


async def test_a_draining_router_closes_sessions_with_1001(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = CONFIG + "\n[server]\ndrain_timeout_s = 1.0\n"
    async with routed_pool(http, tmp_path, VIDEO, config=config) as router:
        [worker] = router.workers
        async with session(router.url) as ws:
            await wait_until(lambda: _sessions_are(http, router.url, {worker.url: 1}))
            router.process.send_signal(signal.SIGTERM)
            await wait_until(lambda: _draining(http, router.url))
            refused = await upgrade_without_websocket_client(router.url, AUTH)
            assert refused.status == 503 and "draining" in refused.json()["error"]
            _, code, reason = await until_closed(ws)
        assert code == 1001 and "shutting down" in reason
        with trio.fail_after(10):
            assert await router.process.wait() == 0
        record = await sim_realtime(http, worker.url)
        assert record["client_close"] == [1001, reason]


async def _draining(http: httpx.AsyncClient, router: str) -> bool:
    return (await http.get(f"{router}/health")).status_code == 503


async def test_job_events_stream_until_the_video_completes(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = CONFIG + "\n[realtime]\nevents_poll_s = 0.1\n"
    async with routed_pool(
        http, tmp_path, ("--task-type", "T2V", "--sec-per-mpx-step", "0.05"), config=config
    ) as router:
        headers = dict(AUTH)
        unknown = await http.get(f"{router.url}/v1/videos/nope/events", headers=headers)
        assert unknown.status_code == 404
        created = await http.post(
            f"{router.url}/v1/videos",
            json={"prompt": "a fox", "size": "64x64", "seconds": 1, "fps": 8},
            headers=headers,
        )
        job_id = created.json()["id"]
        streams = await _two_listeners(http, f"{router.url}/v1/videos/{job_id}/events", headers)
        for events in streams:
            names = [name for name, _ in events]
            assert names[-1] == "completed", names
            assert set(names) <= {"queued", "in_progress", "completed"}
            final = events[-1][1]
            assert final["id"] == job_id and final["progress"] == 100
            progress = [job["progress"] for _, job in events]
            assert progress == sorted(progress)


async def _two_listeners(
    http: httpx.AsyncClient, url: str, headers: dict[str, str]
) -> list[list[tuple[str, dict[str, Any]]]]:
    results: list[list[tuple[str, dict[str, Any]]]] = [[], []]

    async def listen(index: int) -> None:
        async with http.stream("GET", url, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream"
            name = ""
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    results[index].append((name, json.loads(line.removeprefix("data: "))))

    with trio.fail_after(SESSION_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen, 0)
            nursery.start_soon(listen, 1)
    return results
