"""`GET /v1/videos/{id}/events`: a video job's status and progress as Server-Sent Events.

Workers have no push channel for job progress (`WORKER_API.md` §6), so the router polls
the job's owner (`JobAffinity.owner`) with `GET /v1/videos/{id}`, once per
`realtime.events_poll_s` per job however many clients listen: one `_Watch` per job id,
polled by one task in the `JobEvents.run` nursery while it has listeners. Every listener
gets the job object (as the worker wrote it) each time its status or progress changes,
as `event: <status>` with the object as `data`, and the stream ends after `completed` or
`failed`. A job that disappears (deleted, its worker restarted) or whose worker dies ends
the stream with `event: error`. A client that leaves only stops its own stream; the poll
stops with the last listener. While the router drains, streams end at once (a client
reconnects to another router and gets the current state first).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import attrs
import trio

from dsrouter.asgi import Receive, Send, send_json
from dsrouter.config import Config
from dsrouter.jobs import JobAffinity
from dsrouter.registry import Health, Registry
from dsrouter.workers_http import WorkerHTTP

log = logging.getLogger("dsrouter.events")

EVENTS_LABEL = "/v1/videos/{id}/events"
TERMINAL = frozenset({"completed", "failed"})
_EVENTS_PATH = re.compile(r"^/v1/videos/([^/]+)/events$")
HEAD = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
"""`x-accel-buffering: no` keeps an nginx in front from holding events back."""


def events_job(path: str) -> str | None:
    """The job id of an events path, else None."""
    match = _EVENTS_PATH.match(path)
    return match.group(1) if match else None


@attrs.define(eq=False)
class _Watch:
    """One job's latest state, shared by its listeners and written by its one poller."""

    job_id: str
    listeners: int = 0
    job: dict[str, Any] | None = None
    version: int = 0
    """Bumped with every change of `job` (or the end): listeners send what they missed."""
    error: str | None = None
    """Why the stream ends without a final status (set with `ended`)."""
    not_found: bool = False
    ended: bool = False
    changed: trio.Event = attrs.Factory(trio.Event)
    poller: trio.CancelScope = attrs.Factory(trio.CancelScope)

    def publish(self) -> None:
        self.version += 1
        self.changed.set()
        self.changed = trio.Event()

    def end(self, error: str | None = None, *, not_found: bool = False) -> None:
        self.error, self.not_found, self.ended = error, not_found, True
        self.publish()


class JobEvents:
    """The events route: shared pollers (run in `run`'s nursery) and the streams."""

    def __init__(
        self,
        registry: Registry,
        workers: WorkerHTTP,
        jobs: JobAffinity,
        config: Callable[[], Config],
    ) -> None:
        self.registry = registry
        self.workers = workers
        self.jobs = jobs
        self._config = config
        self._watches: dict[str, _Watch] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the pollers' nursery for the router's life."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def end_all(self) -> None:
        """The router drains: every stream ends now."""
        self._closing.set()

    async def handle(self, job_id: str, receive: Receive, send: Send) -> None:
        """Stream one client's events until the job ends, the client leaves or we drain."""
        watch = self._watches.get(job_id)
        if watch is None:
            assert self._nursery is not None, "JobEvents.run is not running"
            watch = self._watches[job_id] = _Watch(job_id)
            self._nursery.start_soon(self._poll, watch)
        watch.listeners += 1
        started = False
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_on_disconnect, receive, nursery.cancel_scope)
                nursery.start_soon(_cancel_on, self._closing, nursery.cancel_scope)
                while not watch.version:
                    await watch.changed.wait()
                if watch.not_found:
                    await send_json(send, 404, {"error": f"Video not found: {job_id}"})
                    nursery.cancel_scope.cancel()
                    return
                await send({"type": "http.response.start", "status": 200, "headers": HEAD})
                started = True
                await self._stream(watch, send)
                nursery.cancel_scope.cancel()
        finally:
            watch.listeners -= 1
            if not watch.listeners:
                watch.poller.cancel()
                if self._watches.get(job_id) is watch:
                    del self._watches[job_id]
            if started:
                with trio.CancelScope(shield=True):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, watch: _Watch, send: Send) -> None:
        sent = 0
        sent_job: dict[str, Any] | None = None
        while True:
            if watch.version > sent:
                sent = watch.version
                if watch.job is not None and watch.job is not sent_job:
                    sent_job = watch.job
                    await send(_event(str(sent_job.get("status")), sent, sent_job))
                if watch.error is not None:
                    await send(_event("error", sent, {"error": watch.error}))
                if watch.ended:
                    return
            await watch.changed.wait()

    async def _poll(self, watch: _Watch) -> None:
        """Poll the job's owner while anyone listens, at most once per `events_poll_s`."""
        with watch.poller:
            config = self._config()
            timeout_s = config.timeouts.discovery_s
            worker = await self.jobs.owner("videos", watch.job_id, timeout_s)
            if worker is None:
                watch.end(f"Video not found: {watch.job_id}", not_found=True)
                return
            path = f"/v1/videos/{quote(watch.job_id, safe='')}"
            while True:
                answer = await self.workers.call(
                    worker.url, "GET", path, api_key=worker.api_key, timeout_s=timeout_s
                )
                if answer.status == 404:
                    watch.end(
                        f"Video {watch.job_id} is gone from its worker", not_found=not watch.version
                    )
                    return
                if answer.ok:
                    job = _job_of(answer.body)
                    if job is not None and _moved(watch.job, job):
                        watch.job = job
                        if job.get("status") in TERMINAL:
                            self.jobs.learn(watch.job_id, False, job, worker, "videos")
                            watch.end()
                            return
                        watch.publish()
                elif worker.health is Health.DEAD or self.registry.by_url(worker.url) is None:
                    watch.end(f"worker {worker.display_id} of video {watch.job_id} is gone")
                    return
                await trio.sleep(self._config().realtime.events_poll_s)


def _job_of(body: bytes) -> dict[str, Any] | None:
    try:
        job = json.loads(body)
    except ValueError:
        return None
    return job if isinstance(job, dict) else None


def _moved(before: dict[str, Any] | None, after: dict[str, Any]) -> bool:
    """Status or progress changed (the only fields a listener waits for)."""
    if before is None:
        return True
    return (before.get("status"), before.get("progress")) != (
        after.get("status"),
        after.get("progress"),
    )


def _event(name: str, event_id: int, data: dict[str, Any]) -> dict[str, Any]:
    text = f"event: {name}\nid: {event_id}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"
    return {"type": "http.response.body", "body": text.encode(), "more_body": True}


async def _cancel_on_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _cancel_on(event: trio.Event, scope: trio.CancelScope) -> None:
    await event.wait()
    scope.cancel()
