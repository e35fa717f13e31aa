"""Where a worker's stdout and stderr go.

Both streams share one pipe that the router reads, so output is never lost to a full pipe
and a log file can be rotated under a running worker. With `launcher.log_dir`, each worker
writes `<log_dir>/worker-<index>.log`, rotated at `log_max_mb` with one old file kept
(`.log.1`); without it, every line goes to the router's log as logger
`dsrouter.worker.<index>` at info level. Either way the last lines of the current run are
kept in memory: they explain an exit during start-up.
"""

from __future__ import annotations

import collections
import logging
import re
import time
from pathlib import Path
from typing import BinaryIO

import trio

TAIL_LINES = 20
MAX_LINE_BYTES = 16 * 1024
"""A longer run of output without a newline is cut into lines of this size."""
_LINE_END = re.compile(rb"\r\n|\r|\n")


class RotatingFile:
    """An append-only file that moves itself to `<name>.1` before it would exceed `max_bytes`."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._fh: BinaryIO = path.open("ab")
        self._size = self._fh.tell()

    def write(self, data: bytes) -> None:
        if self._size and self._size + len(data) > self.max_bytes:
            self._fh.close()
            self.path.replace(self.path.with_name(self.path.name + ".1"))
            self._fh = self.path.open("ab")
            self._size = 0
        self._fh.write(data)
        self._fh.flush()
        self._size += len(data)

    def close(self) -> None:
        self._fh.close()


class WorkerOutput:
    """The sink of one worker's output across all of its runs."""

    def __init__(self, index: int, log_dir: Path | None, max_bytes: int, prefix: str = "") -> None:
        self.index = index
        self._prefix = f"{prefix} " if prefix else ""
        self.path = None if log_dir is None else log_dir / f"worker-{index}.log"
        self._max_bytes = max_bytes
        self._file: RotatingFile | None = None
        self._log = logging.getLogger(f"dsrouter.worker.{index}")
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)

    def begin_run(self, description: str) -> None:
        """Start a new run: forget the previous tail, mark the boundary in the file."""
        self.tail.clear()
        if self.path is not None:
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = RotatingFile(self.path, self._max_bytes)
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            self._file.write(f"---- dsrouter {stamp}: {description}\n".encode())

    def line(self, text: str) -> None:
        self.tail.append(text)
        if self._file is not None:
            self._file.write(text.encode() + b"\n")
        else:
            self._log.info("%s%s", self._prefix, text)

    async def pump(self, stream: trio.abc.ReceiveStream) -> None:
        """Copy `stream` line by line until EOF (every writer closed the pipe)."""
        pending = b""
        async for chunk in stream:
            pending += chunk
            *complete, pending = _LINE_END.split(pending)
            while len(pending) > MAX_LINE_BYTES:
                complete.append(pending[:MAX_LINE_BYTES])
                pending = pending[MAX_LINE_BYTES:]
            for raw in complete:
                if raw:
                    self.line(raw.decode(errors="replace"))
        if pending:
            self.line(pending.decode(errors="replace"))

    def describe_tail(self) -> str:
        where = str(self.path) if self.path is not None else "the router's log"
        if not self.tail:
            return f"it printed nothing (log: {where})"
        lines = "\n    ".join(self.tail)
        return f"last lines of its output ({where}):\n    {lines}"

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
