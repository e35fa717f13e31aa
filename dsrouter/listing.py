"""The pool-wide job list: each worker lists only its own jobs, so the router merges them.

Pages are re-cut with the worker's own cursor rules (`after`, `limit` 1..100, `order`),
sorted by `created_at` then id, so a client paging through the router sees one list.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs

import httpx
import trio

from dsrouter.registry import Worker

PAGE = 100
MAX_PAGES_PER_WORKER = 20


async def merged_job_list(
    client: httpx.AsyncClient,
    workers: list[Worker],
    path: str,
    query_string: bytes,
    timeout_s: float,
) -> tuple[int, dict[str, Any]]:
    """Return (status, body); the body carries `_owners` (worker url, id) pairs to learn."""
    query = parse_qs(query_string.decode("latin-1"))
    order = query.get("order", ["desc"])[0]
    after = query.get("after", [None])[0]
    try:
        limit = int(query.get("limit", ["20"])[0])
    except ValueError:
        limit = 0
    if not 1 <= limit <= PAGE or order not in ("asc", "desc"):
        return 422, {"error": "limit must be 1..100 and order asc or desc"}
    jobs: list[tuple[str, dict[str, Any]]] = []

    async def collect(worker: Worker) -> None:
        cursor: str | None = None
        with trio.move_on_after(timeout_s):
            for _ in range(MAX_PAGES_PER_WORKER):
                params = {"limit": str(PAGE), "order": "desc"}
                if cursor:
                    params["after"] = cursor
                try:
                    response = await client.get(worker.url + path, params=params)
                    page = response.json() if response.status_code == 200 else {}
                except (httpx.HTTPError, ValueError):
                    return
                data = page.get("data") if isinstance(page, dict) else None
                if not isinstance(data, list):
                    return
                jobs.extend((worker.url, job) for job in data if isinstance(job, dict))
                if not page.get("has_more") or not data:
                    return
                cursor = page.get("last_id")

    async with trio.open_nursery() as nursery:
        for worker in workers:
            nursery.start_soon(collect, worker)
    jobs.sort(
        key=lambda item: (item[1].get("created_at") or 0, str(item[1].get("id"))),
        reverse=order == "desc",
    )
    ids = [str(job.get("id")) for _, job in jobs]
    if after is not None:
        start = ids.index(after) + 1 if after in ids else len(jobs)
        jobs = jobs[start:]
    page_jobs = jobs[:limit]
    data = [job for _, job in page_jobs]
    return 200, {
        "object": "list",
        "data": data,
        "first_id": data[0].get("id") if data else None,
        "last_id": data[-1].get("id") if data else None,
        "has_more": len(jobs) > limit,
        "_owners": [(url, str(job.get("id"))) for url, job in page_jobs],
    }
