"""The simulated worker's realtime WebSocket route, spoken to directly (`WORKER_API.md` §12).

Not in the shared contract suite: the tiny CPU pipeline of `[real]` has no realtime
adapter, so only the refusals could be compared there.
"""

from __future__ import annotations

import msgpack
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from dsrouter.workers_http.websocket import close_socket
from tests.support import raw_request, start_simworker

PATH = "/v1/realtime_video/generate"
INVALID_INIT = {"type": "error", "content": "invalid generate request"}


async def test_one_session_at_a_time_and_the_second_gets_1008() -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, "--task-type", "T2V")
        url = worker.url.replace("http://", "ws://") + PATH
        with trio.fail_after(15):
            async with open_websocket_url(url) as first:
                await first.send_message(msgpack.packb({"type": "init"}))
                assert msgpack.unpackb(await first.get_message()) == INVALID_INIT
                async with open_websocket_url(url) as second:
                    refusal = msgpack.unpackb(await second.get_message())
                    try:
                        await second.get_message()
                    except ConnectionClosed as closed:
                        assert closed.reason is not None and closed.reason.code == 1008
                    await close_socket(second)
                assert refusal == {
                    "type": "error",
                    "content": "another realtime session is already active",
                }
                # The first session is still waiting for a valid init.
                init = {"type": "init", "prompt": "x", "size": "8x8", "max_chunks": 1}
                await first.send_message(msgpack.packb(init))
                kinds = []
                try:
                    while True:
                        kinds.append(msgpack.unpackb(await first.get_message())["type"])
                except ConnectionClosed as closed:
                    assert closed.reason is not None
                    assert (closed.reason.code, closed.reason.reason) == (
                        1000,
                        "generation complete",
                    )
                await close_socket(first)
            assert kinds == ["frame_batch", "frame_batch", "chunk_stats"]
        nursery.cancel_scope.cancel()


async def test_image_models_refuse_init_and_unknown_paths_refuse_the_upgrade() -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, "--task-type", "T2I")
        url = worker.url.replace("http://", "ws://") + PATH
        with trio.fail_after(15):
            async with open_websocket_url(url) as ws:
                init = {"type": "init", "prompt": "x", "size": "8x8"}
                await ws.send_message(msgpack.packb(init))
                assert msgpack.unpackb(await ws.get_message()) == INVALID_INIT
            head = (
                "GET /v1/actions/realtime HTTP/1.1\r\nHost: w\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            )
            assert (await raw_request(worker.url, head.encode())).status == 403
        nursery.cancel_scope.cancel()
