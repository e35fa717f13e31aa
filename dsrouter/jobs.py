"""Job affinity: which worker owns which job id (videos, meshes, stored images).

Worker-generated ids are bare uuid4s that do not encode their worker, so the router learns the
owner from create answers and, for ids it never saw (it restarted, or a replica created the
job), by asking the workers. The map is bounded: when full, the oldest finished entries go
first, then the oldest of all. The registry holds the map (removing a worker forgets its
jobs); `JobAffinity` is what reads and writes it.

Each worker lists only its own jobs, so the pool-wide list is merged here too: pages are
re-cut with the worker's own cursor rules (`after`, `limit` 1..100, `order`), sorted by
`created_at` then id, so a client paging through the router sees one list.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote

import attrs

from dsrouter.workers_http import WorkerHTTP, fan_out

if TYPE_CHECKING:
    from dsrouter.registry import Registry, Worker

PAGE = 100
MAX_PAGES_PER_WORKER = 20


@attrs.define
class JobEntry:
    worker_url: str
    kind: str
    finished: bool = False


class JobMap:
    """Job id -> owner, bounded; every operation but `forget_worker` costs O(1).

    Finished jobs (and stored images, which never change) live in their own age-ordered
    map, so eviction takes the oldest finished entry first, then the oldest unfinished
    one, without scanning: at capacity an insert costs what it costs on an empty map.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._open: OrderedDict[str, JobEntry] = OrderedDict()
        self._done: OrderedDict[str, JobEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._open) + len(self._done)

    def remember(self, job_id: str, worker_url: str, kind: str, finished: bool = False) -> None:
        self.forget(job_id)
        entries = self._done if finished else self._open
        entries[job_id] = JobEntry(worker_url, kind, finished)
        self._evict()

    def owner(self, job_id: str) -> str | None:
        entry = self._open.get(job_id) or self._done.get(job_id)
        return entry.worker_url if entry else None

    def mark_finished(self, job_id: str) -> None:
        entry = self._open.pop(job_id, None)
        if entry is not None:
            entry.finished = True
            self._done[job_id] = entry

    def forget(self, job_id: str) -> None:
        self._open.pop(job_id, None)
        self._done.pop(job_id, None)

    def forget_worker(self, worker_url: str) -> int:
        """Drop a removed worker's jobs (a scan: membership changes are rare)."""
        forgotten = 0
        for entries in (self._open, self._done):
            doomed = [k for k, e in entries.items() if e.worker_url == worker_url]
            for key in doomed:
                del entries[key]
            forgotten += len(doomed)
        return forgotten

    def _evict(self) -> None:
        while len(self) > self.capacity:
            (self._done or self._open).popitem(last=False)


def job_id_from(payload: Any) -> str | None:
    """The id in a create answer: `id`, `video_id` or `job_id`, also inside `data[0]`."""
    if not isinstance(payload, dict):
        return None
    data = payload.get("data")
    first = data[0] if isinstance(data, list) and data else None
    for source in (payload, first):
        if isinstance(source, dict):
            for key in ("id", "video_id", "job_id"):
                value = source.get(key)
                if isinstance(value, str) and value:
                    return value
    return None


def _stored_on_worker(payload: Any) -> bool:
    """Whether the worker kept the image (`GET /v1/images/{id}/content` can fetch it): a
    relative `url`, or a `file_path`. Otherwise (an S3 URL, or b64 with no output path)
    nobody will ask the router for it again, and remembering it only costs room."""
    data = payload.get("data") if isinstance(payload, dict) else None
    for item in data if isinstance(data, list) else []:
        if isinstance(item, dict):
            url = item.get("url")
            if (isinstance(url, str) and url.startswith("/")) or item.get("file_path"):
                return True
    return False


class JobAffinity:
    """Remember job owners from answers, find unknown ones, merge the pool's job lists."""

    def __init__(self, registry: Registry, workers: WorkerHTTP) -> None:
        self.registry = registry
        self.workers = workers

    def learn(
        self, job_id: str | None, created: bool, payload: Any, worker: Worker, kind: str
    ) -> None:
        """Learn from a JSON answer about `job_id` (else the id the answer names): a create
        answer makes `worker` its owner; a finished status lets its entry go first."""
        job_id = job_id or job_id_from(payload)
        if job_id is None:
            return
        if created and kind == "images":
            if _stored_on_worker(payload):  # an image never changes: finished at once
                self.registry.jobs.remember(job_id, worker.url, kind, finished=True)
        elif created:
            self.registry.jobs.remember(job_id, worker.url, kind)
        elif isinstance(payload, dict) and payload.get("status") in ("completed", "failed"):
            self.registry.jobs.mark_finished(job_id)

    def forget(self, job_id: str) -> None:
        self.registry.jobs.forget(job_id)

    async def owner(self, kind: str, job_id: str, timeout_s: float) -> Worker | None:
        """The worker that owns the job: remembered, or found by asking the pool."""
        jobs = self.registry.jobs
        url = jobs.owner(job_id)
        if url is not None:
            worker = self.registry.by_url(url)
            if worker is not None:
                return worker
            jobs.forget(job_id)
        # The id came from the decoded path; any character may be in it (a NUL is not a
        # valid URL), so it is encoded back for the lookup.
        job = quote(job_id, safe="")
        path = f"/v1/images/{job}/content" if kind == "images" else f"/v1/{kind}/{job}"
        candidates = [w for w in self.registry.workers() if w.health.value != "dead"]

        async def has_it(worker: Worker) -> bool:
            status = await self.workers.status(
                worker.url, path, api_key=worker.api_key, timeout_s=timeout_s
            )
            return status == 200

        answers = await fan_out(candidates, has_it, timeout_s, enough=bool)
        found = [w for w, yes in zip(candidates, answers, strict=True) if yes]
        if not found:
            return None
        jobs.remember(job_id, found[0].url, kind)
        return found[0]

    async def merged_list(
        self, workers: list[Worker], path: str, query_string: bytes, kind: str, timeout_s: float
    ) -> tuple[int, dict[str, Any]]:
        """(status, body) of the pool-wide list; the owners of the listed jobs are learned."""
        query = parse_qs(query_string.decode("latin-1"))
        order = query.get("order", ["desc"])[0]
        after = query.get("after", [None])[0]
        try:
            limit = int(query.get("limit", ["20"])[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= PAGE or order not in ("asc", "desc"):
            return 422, {"error": "limit must be 1..100 and order asc or desc"}
        jobs: list[tuple[str, dict[str, Any]]] = []  # pages read before a timeout count

        async def collect(worker: Worker) -> None:
            async for job in self._pages(worker, path, timeout_s):
                jobs.append((worker.url, job))

        await fan_out(workers, collect, timeout_s)
        jobs.sort(
            key=lambda item: (item[1].get("created_at") or 0, str(item[1].get("id"))),
            reverse=order == "desc",
        )
        ids = [str(job.get("id")) for _, job in jobs]
        if after is not None:
            start = ids.index(after) + 1 if after in ids else len(jobs)
            jobs = jobs[start:]
        page_jobs = jobs[:limit]
        for url, job in page_jobs:
            self.registry.jobs.remember(str(job.get("id")), url, kind)
        data = [job for _, job in page_jobs]
        return 200, {
            "object": "list",
            "data": data,
            "first_id": data[0].get("id") if data else None,
            "last_id": data[-1].get("id") if data else None,
            "has_more": len(jobs) > limit,
        }

    async def _pages(
        self, worker: Worker, path: str, timeout_s: float
    ) -> AsyncIterator[dict[str, Any]]:
        """One worker's jobs (up to `MAX_PAGES_PER_WORKER` pages), newest first."""
        cursor: str | None = None
        for _ in range(MAX_PAGES_PER_WORKER):
            params = {"limit": str(PAGE), "order": "desc"}
            if cursor:
                params["after"] = cursor
            answer = await self.workers.call(
                worker.url, "GET", path, api_key=worker.api_key, params=params, timeout_s=timeout_s
            )
            try:
                page = answer.json() if answer.ok else {}
            except ValueError:
                return
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list):
                return
            for job in data:
                if isinstance(job, dict):
                    yield job
            if not page.get("has_more") or not data:
                return
            cursor = page.get("last_id")
