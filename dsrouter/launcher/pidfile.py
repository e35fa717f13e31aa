"""A record of the router's worker processes on disk, so the next start can clean up.

The parent-death signal kills every direct child of a router that was SIGKILLed, but not the
processes those children started (an sglang worker's GPU ranks, for one). Each router
therefore keeps `<runtime dir>/router-<pid>.json` listing its workers' process groups, and
gives every worker a random `DSROUTER_LAUNCH_TOKEN` in its environment, which all of the
worker's descendants inherit. At start-up, `clean_stale` reads the files of routers that are
no longer running and SIGKILLs every process still carrying their token, and only those:
a pid that was recycled by an unrelated program does not have the token, so it is left
alone. Files of routers that are still running are not touched.

The runtime dir is `$DSROUTER_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/dsrouter`, else
`/tmp/dsrouter-<uid>`; it must be a directory owned by this user.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger("dsrouter.launcher")

TOKEN_VAR = "DSROUTER_LAUNCH_TOKEN"
STALE_EXIT_TIMEOUT_S = 10.0


def runtime_dir(environ: Mapping[str, str] = os.environ) -> Path:
    explicit = environ.get("DSROUTER_RUNTIME_DIR")
    if explicit:
        return Path(explicit)
    xdg = environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "dsrouter"
    return Path(f"/tmp/dsrouter-{os.getuid()}")


def _owned(path: Path) -> bool:
    """A real directory (not a symlink) of this user: only such a dir is trusted."""
    try:
        info = path.lstat()
    except OSError:
        return False
    return stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()


def _own_dir(path: Path) -> bool:
    """Create `path` private to this user; False if it exists and belongs to someone else."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    return _owned(path)


def _start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (field 22 of /proc/pid/stat): tells pid reuse apart."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def _carries(pid: int, token: str) -> bool:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False
    return f"{TOKEN_VAR}={token}".encode() in environ.split(b"\0")


def processes_with_token(token: str) -> list[int]:
    """Every live process whose environment carries `token` (our workers and descendants)."""
    me = os.getpid()
    return [
        int(entry.name)
        for entry in Path("/proc").iterdir()
        if entry.name.isdigit() and int(entry.name) != me and _carries(int(entry.name), token)
    ]


class PidFile:
    """This router's record: its own identity, its token, and one process group per worker."""

    def __init__(self, directory: Path | None) -> None:
        self.token = secrets.token_hex(16)
        self.path = None if directory is None else directory / f"router-{os.getpid()}.json"
        self._groups: dict[int, int] = {}

    def set_group(self, index: int, pgid: int | None) -> None:
        """Record (or, with None, forget) worker `index`'s process group, then save."""
        if pgid is None:
            self._groups.pop(index, None)
        else:
            self._groups[index] = pgid
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        record = {
            "router_pid": os.getpid(),
            "router_start": _start_time(os.getpid()),
            "token": self.token,
            "groups": {str(i): pgid for i, pgid in sorted(self._groups.items())},
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(self.path)

    def remove(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def open_pidfile(directory: Path) -> PidFile:
    """The record for this router in `directory`; a directory we do not own disables it."""
    try:
        usable = _own_dir(directory)
    except OSError as exc:
        log.warning(
            "cannot use %s for the worker pid file (%s): processes of a router that "
            "is SIGKILLed will not be cleaned up at the next start",
            directory,
            exc.strerror,
        )
        return PidFile(None)
    if not usable:
        log.warning("%s is not a directory owned by this user: no worker pid file", directory)
        return PidFile(None)
    pidfile = PidFile(directory)
    pidfile._save()
    return pidfile


async def clean_stale(directory: Path) -> int:
    """SIGKILL the workers of routers that died without stopping them; returns how many.

    Waits (bounded) until they are gone, so their ports are free for the port check.
    """
    killed = kill_stale(directory)
    with trio.move_on_after(STALE_EXIT_TIMEOUT_S):
        while not all(map(_gone, killed)):  # noqa: ASYNC110 - other processes, no event
            await trio.sleep(0.05)
    return len(killed)


def kill_stale(directory: Path) -> list[int]:
    """Read every pid file of a dead router in `directory`, kill its processes, delete it."""
    if not _owned(directory):
        return []
    killed: list[int] = []
    for path in sorted(directory.glob("router-*.json")):
        record = _read(path)
        if record is None:
            continue
        pid = record.get("router_pid")
        if isinstance(pid, int) and _start_time(pid) == record.get("router_start"):
            continue  # that router is still running
        token = record.get("token")
        if isinstance(token, str) and token:
            stale = processes_with_token(token)
            for victim in stale:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            if stale:
                groups = sorted(set(record.get("groups", {}).values()))
                log.warning(
                    "router pid %s died without stopping its workers: killed %d "
                    "leftover process(es) of group(s) %s",
                    pid,
                    len(stale),
                    ", ".join(map(str, groups)),
                )
            killed += stale
        path.unlink(missing_ok=True)
    return killed


def _gone(pid: int) -> bool:
    """Exited: no /proc entry, or a zombie waiting for a parent that is not us."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return raw.rpartition(")")[2].split()[:1] == ["Z"]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("ignoring unreadable worker pid file %s", path)
        return None
    return record if isinstance(record, dict) else None
