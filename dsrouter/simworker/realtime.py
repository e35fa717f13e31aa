"""`WS /v1/realtime_video/generate` as the real worker serves it (`WORKER_API.md` §12).

Every frame is binary msgpack. The client's `{"type": "init", ...}` starts a generation of
`max_chunks` chunks (until the client leaves without it); each chunk is
`NUM_FRAME_BATCHES` `frame_batch` messages (a `frame_batch_header` followed by a raw
binary frame when the payload exceeds `LARGE_PAYLOAD`) and a `chunk_stats`. An invalid
init gets `{"type":"error","content":"invalid generate request"}` and the session keeps
waiting; an invalid event gets `"invalid event"`; a valid event's `event_id` is carried
by the next frame batch. One session at a time: a second waits up to `BUSY_WAIT_S`, then
gets an error frame and close code 1008. When `max_chunks` is reached the worker closes
with 1000 "generation complete".

Only the realtime video route is mounted: the action loops (`/v1/actions/realtime`,
`/openpi/policy`) exist only on VLA-action pipelines, which the simulator does not model,
so their upgrades are refused as a real worker without them does (403). Other WebSocket
paths are refused the same way.

For tests, `/_sim/state` shows `realtime`: the SHA-256 of every message the current or
last session received and sent, and the close code and reason the client sent.
"""

from __future__ import annotations

import hashlib
from typing import Any

import attrs
import msgpack
import trio

from dsrouter.simworker.asgi import Receive, Scope, Send
from dsrouter.simworker.options import TASK_OUTPUTS
from dsrouter.simworker.state import RealtimeLog, SimWorker

PATH = "/v1/realtime_video/generate"
BUSY_WAIT_S = 1.0
FRAMES_PER_CHUNK = 4
NUM_FRAME_BATCHES = 2
LARGE_PAYLOAD = 256 * 1024
"""Payloads above this go as a header message plus a raw binary frame."""
OUTPUT_FORMATS = frozenset({"raw", "webp", "jpeg"})


class ClientClosed(Exception):
    pass


@attrs.define
class _Init:
    request_id: str
    width: int
    height: int
    max_chunks: int | None
    output_format: str


class Session:
    def __init__(self, worker: SimWorker, receive: Receive, send: Send) -> None:
        self.worker = worker
        self._receive = receive
        self._send = send
        self.log: RealtimeLog = worker.realtime
        self.pending_event: int | None = None

    async def send(self, payload: Any) -> None:
        data = payload if isinstance(payload, bytes) else msgpack.packb(payload)
        self.log.note(self.log.sent, data)
        await self._send({"type": "websocket.send", "bytes": data})

    async def receive(self) -> Any:
        """The next message, unpacked; None when it is not a msgpack map (text included)."""
        message = await self._receive()
        if message["type"] == "websocket.disconnect":
            self.log.client_close = (message.get("code", 1000), message.get("reason") or "")
            raise ClientClosed
        raw = message.get("bytes")
        data = raw if raw is not None else (message.get("text") or "").encode()
        self.log.note(self.log.received, data)
        if raw is None:
            return None
        try:
            value = msgpack.unpackb(raw)
        except (ValueError, msgpack.UnpackException):
            return None
        return value if isinstance(value, dict) else None

    async def run(self) -> None:
        init = None
        while init is None:
            init = self._init(await self.receive())
            if init is None:
                await self.send({"type": "error", "content": "invalid generate request"})
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._events, nursery.cancel_scope)
            await self._generate(init)
            nursery.cancel_scope.cancel()
        if self.log.client_close is None:
            await self._send(
                {"type": "websocket.close", "code": 1000, "reason": "generation complete"}
            )

    def _init(self, message: Any) -> _Init | None:
        video = any(TASK_OUTPUTS[t] == "VIDEO" for t in self.worker.options.task_types)
        if not video or message is None or message.get("type") != "init":
            return None
        prompt = message.get("prompt")
        size = message.get("size", "832x480")
        max_chunks = message.get("max_chunks")
        output_format = message.get("realtime_output_format", "raw")
        try:
            width, height = (int(v) for v in str(size).lower().split("x"))
        except ValueError:
            return None
        if (
            not isinstance(prompt, str)
            or not 0 < width * height <= 4096 * 4096
            or (max_chunks is not None and (not isinstance(max_chunks, int) or max_chunks < 1))
            or output_format not in OUTPUT_FORMATS
        ):
            return None
        self.worker.job_seq += 1
        request_id = f"rt_{self.worker.port}_{self.worker.job_seq}"
        return _Init(request_id, width, height, max_chunks, output_format)

    async def _events(self, session: trio.CancelScope) -> None:
        """Read the client's events while the generation runs; its close ends both."""
        while True:
            try:
                message = await self.receive()
            except ClientClosed:
                session.cancel()
                return
            if (
                message is None
                or message.get("type") != "event"
                or not isinstance(message.get("kind"), str)
                or not isinstance(message.get("event_id", 0), int)
            ):
                await self.send({"type": "error", "content": "invalid event"})
            elif message.get("event_id") is not None:
                self.pending_event = message["event_id"]

    async def _generate(self, init: _Init) -> None:
        frames_per_batch = FRAMES_PER_CHUNK // NUM_FRAME_BATCHES
        per_frame = init.width * init.height * 3
        if init.output_format != "raw":
            per_frame = max(1, per_frame // 10)
        chunk_s = self.worker.service_seconds(init.width * init.height / 1e6 * FRAMES_PER_CHUNK)
        chunk = 0
        while init.max_chunks is None or chunk < init.max_chunks:
            await trio.sleep(chunk_s)
            for batch in range(NUM_FRAME_BATCHES):
                payload = _payload(init.request_id, chunk, batch, per_frame * frames_per_batch)
                head: dict[str, Any] = {
                    "request_id": init.request_id,
                    "chunk_index": chunk,
                    "content_type": f"video/{init.output_format}",
                    "num_frames": frames_per_batch,
                    "total_size": len(payload),
                    "frame_batch_index": batch,
                    "num_frame_batches": NUM_FRAME_BATCHES,
                    "is_final_frame_batch": batch == NUM_FRAME_BATCHES - 1,
                }
                if self.pending_event is not None:
                    head["event_id"], self.pending_event = self.pending_event, None
                if len(payload) > LARGE_PAYLOAD:
                    await self.send({"type": "frame_batch_header", **head})
                    await self.send(payload)
                else:
                    await self.send({"type": "frame_batch", **head, "payload": payload})
            await self.send(
                {
                    "type": "chunk_stats",
                    "request_id": init.request_id,
                    "chunk_index": chunk,
                    "num_frames": FRAMES_PER_CHUNK,
                    "generation_time_s": chunk_s,
                }
            )
            chunk += 1


def _payload(request_id: str, chunk: int, batch: int, size: int) -> bytes:
    """Deterministic bytes: the same request, chunk and batch give the same payload."""
    seed = hashlib.sha256(f"{request_id}:{chunk}:{batch}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


async def serve(worker: SimWorker, scope: Scope, receive: Receive, send: Send) -> None:
    """One WebSocket connection to the simulated worker, from handshake to close."""
    if (await receive())["type"] != "websocket.connect":
        return
    if scope["path"] != PATH:
        await send({"type": "websocket.close", "code": 1000})  # before accept: HTTP 403
        return
    await worker.warm.wait()
    await send({"type": "websocket.accept"})
    with trio.move_on_after(BUSY_WAIT_S):
        while worker.realtime_active:
            await worker.realtime_freed.wait()
    if worker.realtime_active:
        frame = msgpack.packb(
            {"type": "error", "content": "another realtime session is already active"}
        )
        await send({"type": "websocket.send", "bytes": frame})
        await send({"type": "websocket.close", "code": 1008})
        return
    worker.realtime_active = True
    worker.realtime.start()
    try:
        await Session(worker, receive, send).run()
    except ClientClosed:
        pass
    finally:
        worker.realtime_active = False
        worker.realtime_freed.set()
        worker.realtime_freed = trio.Event()
