"""Which worker owns which job id (videos, meshes, stored images).

Worker-generated ids are bare uuid4s that do not encode their worker, so the router learns the
owner from create answers and, for ids it never saw (it restarted, or a replica created the
job), by asking the workers. The map is bounded: when full, the oldest finished entries go
first, then the oldest of all.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs


@attrs.define
class JobEntry:
    worker_url: str
    kind: str
    finished: bool = False


class JobMap:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[str, JobEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def remember(self, job_id: str, worker_url: str, kind: str) -> None:
        self._entries[job_id] = JobEntry(worker_url, kind)
        self._entries.move_to_end(job_id)
        self._evict()

    def owner(self, job_id: str) -> str | None:
        entry = self._entries.get(job_id)
        return entry.worker_url if entry else None

    def mark_finished(self, job_id: str) -> None:
        entry = self._entries.get(job_id)
        if entry is not None:
            entry.finished = True

    def forget(self, job_id: str) -> None:
        self._entries.pop(job_id, None)

    def forget_worker(self, worker_url: str) -> int:
        doomed = [k for k, e in self._entries.items() if e.worker_url == worker_url]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def _evict(self) -> None:
        if len(self._entries) <= self.capacity:
            return
        finished = [k for k, e in self._entries.items() if e.finished]
        for key in finished[: len(self._entries) - self.capacity]:
            del self._entries[key]
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
