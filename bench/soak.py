"""Soak of issue 22: weights and sleep under faults, checked on every answer.

Why: the RL control plane promises no answer from weights the trainer has moved past, no
work while the pool sleeps, and a JSON reason for every failure, which must fall inside a
fault. These promises break only where faults meet refits and sleeps, which short tests
rarely line up; this runs them together for minutes. A router on 127.0.0.1 over four
simulated workers serves 12 clients (images as b64 and as url with the content fetched
through the router, videos created, polled and downloaded, job lists) while a trainer-like
controller refits every 30 s and puts the pool to sleep every 60 s for ~10 s, a worker is
SIGKILLed and restarted on its port every ~90 s, and one worker is SIGSTOPped for ~20 s.

    python bench/soak.py --minutes 10 [--out DIR] [--seed N]

Every simulated answer names the weights that made it (`x-simworker-model-path`), the router
names the worker (`x-dsrouter-worker`); the checks use only those, the send and answer times,
the timeline of refits, sleeps, kills and stops, and what the simulated workers themselves
say about their sleep (`/_sim/state`) during each sleep:

- stale: a generation answered from weights older than the last refit that had answered
  before the request was sent (requests in flight across a refit may get either version);
- served while asleep: a generation answered between a release's answer and the resume;
- a worker process up and awake while the pool sleeps (`AWAKE_GRACE_S` after the release,
  or after that process started);
- a non-2xx outside the fault windows (a kill until GET /workers shows the worker healthy
  again, the stop until it is back plus `breaker_open_s`, a sleep from the release to the
  resume's answer, where only 503 "pool is asleep" is expected), a job read lost because
  its owner was killed after creating it excepted;
- a non-2xx without a JSON reason: the router's `{"error": ...}`, or a worker's own
  `{"detail": ...}` passed through verbatim (counted apart).

Loopback only and bounded in time; every process it starts is stopped by PID at the end,
also on Ctrl-C or an exception. Prints a JSON summary (also written to DIR/summary.json,
beside the router's log, every answer, the timeline and the router's view of the workers)
and exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, percentile, rss_mib

BREAKER_OPEN_S = 3.0
CONFIG = f"""
[health]
interval_s = 0.5
failure_threshold = 2
breaker_open_s = {BREAKER_OPEN_S}
[routing]
queue_while_asleep = false
"""
WORKERS = 4
WORKER_ARGS = ["--task-type", "T2I,T2V", "--sec-per-mpx-step", "0.05"]
LAUNCH_WEIGHTS = "sim/Wan-Sim"
"""The simulated worker's default `--model-path`: what a restarted worker serves."""

REFIT_FIRST_S, REFIT_EVERY_S = 5.0, 30.0
SLEEP_FIRST_S, SLEEP_EVERY_S, SLEEP_HOLD_S = 20.0, 60.0, 10.0
KILL_EVERY_S = 90.0
KILL_PHASE_S = [19.0, 19.0, 24.0, 19.0, 19.0, 19.0, 21.0]
"""Offset of kill k in its 90 s period. With sleeps at 20 + 60k the kills alternate between
one second before a sleep (the restart comes back while the pool sleeps), ~15 s after a
refit (the restart comes back on launch weights into a refitted pool) and in the middle of
a sleep (a sleeping worker dies and comes back awake)."""
RESTART_DELAY_S = [2.0, 0.0, 8.0, 3.0, 1.0, 5.0]
"""Seconds between the SIGKILL and the new process, in turn (0: as fast as a supervisor)."""
STOP_AT_S, STOP_FOR_S = 230.0, 20.0
WINDOW_SLACK_S = 1.0
"""Added to the end of every fault window: the router's view lags by a probe round or two."""
CLIENT_TIMEOUT_S = 120.0
AWAKE_GRACE_S = 3.0
"""Seconds a worker process may stay awake after the release, or after it started during a
sleep, before the router should have put it to sleep (a probe round and one call)."""
HARD_LIMIT_EXTRA_S = 420.0
"""Start-up, the last requests, restarts and settling may take this long past the traffic."""
GENERATIONS = frozenset({"image-b64", "image-url", "video-create"})
"""Answers that did work with the worker's weights; the others read stored results."""


# ---- processes ----------------------------------------------------------------------------


class Processes:
    """Every process this soak started, by PID, so that all of them are stopped at the end
    whatever happens (a stopped worker gets SIGCONT first, or SIGTERM would wait)."""

    def __init__(self) -> None:
        self.running: dict[str, subprocess.Popen[bytes]] = {}
        self.stopped: set[str] = set()

    def spawn(self, name: str, argv: list[str], log: Path) -> tuple[subprocess.Popen[bytes], int]:
        """Start `argv` with stdout and stderr appended to `log`; returns it and the log's
        size before it started (where to look for its first lines)."""
        offset = log.stat().st_size if log.exists() else 0
        with log.open("ab") as sink:
            process = subprocess.Popen(
                argv, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.running[name] = process
        return process, offset

    def signal(self, name: str, sig: int) -> None:
        process = self.running[name]
        os.kill(process.pid, sig)
        if sig == signal.SIGSTOP:
            self.stopped.add(name)
        elif sig == signal.SIGCONT:
            self.stopped.discard(name)

    def kill(self, name: str) -> int:
        """SIGKILL and reap; returns the PID it had."""
        process = self.running.pop(name)
        self.stopped.discard(name)
        process.kill()
        process.wait(timeout=10)
        return process.pid

    def stop(self, name: str, timeout_s: float) -> int | None:
        """SIGTERM (SIGKILL after `timeout_s`); returns the exit status."""
        process = self.running.pop(name, None)
        if process is None:
            return None
        if name in self.stopped:
            os.kill(process.pid, signal.SIGCONT)
            self.stopped.discard(name)
        if process.poll() is None:
            process.terminate()
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait(timeout=10)

    def stop_all(self) -> None:
        for name in list(self.running):
            self.stop(name, 40.0 if name == "router" else 10.0)


def _read_from(path: Path, offset: int) -> str:
    with path.open("rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


async def wait_line(
    process: subprocess.Popen[bytes], log: Path, offset: int, marker: str, timeout_s: float = 60
) -> str:
    """The first line after `offset` in `log` that contains `marker`."""
    with trio.fail_after(timeout_s):
        while True:
            for line in _read_from(log, offset).splitlines():
                if marker in line:
                    return line
            if process.poll() is not None:
                raise RuntimeError(f"pid {process.pid} exited before printing {marker!r}")
            await trio.sleep(0.05)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# ---- records ------------------------------------------------------------------------------


@dataclass
class Answer:
    """One request as the client saw it: seconds since the start for `sent` and `done`."""

    kind: str
    request_id: str
    method: str
    path: str
    sent: float
    done: float
    status: int
    """0: no HTTP answer (transport error or client timeout)."""
    worker: str | None
    weights: str | None
    error: str | None = None
    """The JSON `error` of a non-2xx answer, else its `detail` or the start of its text."""
    json_error: bool = False
    """The body is a JSON object with `error` (the router's shape)."""
    json_detail: bool = False
    """The body is a JSON object with `detail` only: a worker's own error, passed through."""
    retry_after: str | None = None
    job_id: str | None = None
    job_owner: str | None = None
    job_created: float | None = None


@dataclass
class Window:
    kind: str
    start: float
    end: float
    worker: str | None = None


@dataclass
class Timeline:
    refits: list[dict[str, Any]] = field(default_factory=list)
    sleeps: list[dict[str, Any]] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    stops: list[dict[str, Any]] = field(default_factory=list)


def weight_index(model_path: str | None) -> int | None:
    """Refit number of the weights an answer names: 0 for the launch weights."""
    if model_path == LAUNCH_WEIGHTS:
        return 0
    match = re.fullmatch(r"sim/step-(\d+)", model_path or "")
    return int(match.group(1)) if match else None


# ---- the soak -----------------------------------------------------------------------------


class Soak:
    """One run: the processes, the clients, the controller, the faults and the records."""

    def __init__(self, minutes: float, out: Path, seed: int) -> None:
        self.duration = minutes * 60
        self.out = out
        self.rng = random.Random(seed)
        self.procs = Processes()
        self.ports = [free_port() for _ in range(WORKERS)]
        self.router_url = ""
        self.router_pid = 0
        self.t0 = time.monotonic()
        self.answers: list[Answer] = []
        self.timeline = Timeline()
        self.samples: list[dict[str, Any]] = []
        self.resources: list[dict[str, float]] = []
        self.states: dict[str, str] = {}
        self.ids = itertools.count(1)
        self.started = [0.0] * WORKERS
        """When each worker's current process began to listen (seconds since the start)."""
        self.done = trio.Event()
        self.asleep = False
        self.video_outcomes: Counter[str] = Counter()
        self.video_failures: Counter[str] = Counter()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 3)

    def name(self, index: int) -> str:
        return f"127.0.0.1:{self.ports[index]}"

    # ---- processes --------------------------------------------------------------------

    async def start_worker(self, index: int) -> int:
        port = self.ports[index]
        argv = [sys.executable, "-m", "dsrouter.simworker", "--host", "127.0.0.1"]
        log = self.out / f"worker-{port}.log"
        process, offset = self.procs.spawn(
            f"worker{index}", [*argv, "--port", str(port), *WORKER_ARGS], log
        )
        line = await wait_line(process, log, offset, "simworker listening on")
        if not line.rstrip().endswith(f":{port}"):
            raise RuntimeError(f"worker {index} did not get port {port}: {line}")
        self.started[index] = self.now()
        return process.pid

    async def start_router(self) -> None:
        config = self.out / "router.toml"
        config.write_text(CONFIG)
        urls = [f"http://{self.name(i)}" for i in range(WORKERS)]
        argv = [sys.executable, "-m", "dsrouter", "run", "--host", "127.0.0.1", "--port", "0"]
        argv += ["--config", str(config), "--worker-urls", *urls]
        log = self.out / "router.log"
        process, offset = self.procs.spawn("router", argv, log)
        line = await wait_line(process, log, offset, "dsrouter listening on")
        self.router_url = line.split("dsrouter listening on ", 1)[1].strip()
        self.router_pid = process.pid

    async def wait_pool(self, http: httpx.AsyncClient, count: int, timeout_s: float = 60) -> None:
        with trio.fail_after(timeout_s):
            while True:
                try:
                    health = (await http.get(f"{self.router_url}/health")).json()
                    if health.get("healthy_workers", 0) >= count:
                        return
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.2)

    # ---- requests ---------------------------------------------------------------------

    async def request(
        self,
        http: httpx.AsyncClient,
        kind: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        job: tuple[str, str | None, float] | None = None,
    ) -> tuple[Answer, Any]:
        """Send one request through the router and record what came back."""
        request_id = f"soak-{next(self.ids):07d}"
        sent = self.now()
        payload: Any = None
        try:
            response = await http.request(
                method, self.router_url + path, json=body, headers={"x-request-id": request_id}
            )
        except httpx.HTTPError as exc:
            answer = Answer(kind, request_id, method, path, sent, self.now(), 0, None, None)
            answer.error = f"{type(exc).__name__}: {exc}"
        else:
            headers = response.headers
            answer = Answer(
                kind,
                request_id,
                method,
                path,
                sent,
                self.now(),
                response.status_code,
                headers.get("x-dsrouter-worker"),
                headers.get("x-simworker-model-path"),
                retry_after=headers.get("retry-after"),
            )
            if headers.get("content-type", "").startswith("application/json"):
                try:
                    payload = response.json()
                except ValueError:
                    payload = None
            if not 200 <= response.status_code < 300:
                if isinstance(payload, dict) and isinstance(payload.get("error"), str | dict):
                    answer.json_error = True
                    answer.error = json.dumps(payload["error"])[:300]
                elif isinstance(payload, dict) and "detail" in payload:
                    answer.json_detail = True
                    answer.error = "detail: " + json.dumps(payload["detail"])[:300]
                else:
                    answer.error = "text: " + response.text[:200]
        if job is not None:
            answer.job_id, answer.job_owner, answer.job_created = job
        self.answers.append(answer)
        return answer, payload

    async def image_client(self, http: httpx.AsyncClient, response_format: str) -> None:
        """Images back to back; a url answer's content is fetched through the router."""
        kind = "image-b64" if response_format == "b64_json" else "image-url"
        while not self.done.is_set():
            body = {
                "prompt": "a soak image",
                "size": "256x256",
                "num_inference_steps": 30,
                "response_format": response_format,
                "seed": self.rng.randint(1, 8),
            }
            answer, payload = await self.request(http, kind, "POST", "/v1/images/generations", body)
            if answer.status == 200 and response_format == "url":
                url = payload["data"][0]["url"]
                job = (payload["id"], answer.worker, answer.done)
                await self.request(http, "image-content", "GET", url, job=job)
            await trio.sleep(self.rng.uniform(0.05, 0.2))

    async def video_client(self, http: httpx.AsyncClient) -> None:
        """Create a short video, poll it until it ends, download it."""
        while not self.done.is_set():
            body = {
                "prompt": "a soak video",
                "size": "256x256",
                "seconds": 1,
                "fps": 8,
                "num_inference_steps": 10,
            }
            answer, payload = await self.request(http, "video-create", "POST", "/v1/videos", body)
            if answer.status != 200 or not isinstance(payload, dict):
                await trio.sleep(1)
                continue
            job = (payload["id"], answer.worker, answer.done)
            status = None
            deadline = trio.current_time() + 90
            while trio.current_time() < deadline:
                await trio.sleep(0.5)
                poll, record = await self.request(
                    http, "video-poll", "GET", f"/v1/videos/{job[0]}", job=job
                )
                if poll.status == 404:
                    status = "lost"
                    break
                ended = isinstance(record, dict) and record.get("status") in ("completed", "failed")
                if poll.status == 200 and ended:
                    status = record["status"]
                    if status == "failed":
                        self.video_failures[str(record.get("error"))] += 1
                    break
            self.video_outcomes[status or "timed out"] += 1
            if status == "completed":
                await self.request(
                    http, "video-content", "GET", f"/v1/videos/{job[0]}/content", job=job
                )
            await trio.sleep(self.rng.uniform(0.1, 0.5))

    async def list_client(self, http: httpx.AsyncClient) -> None:
        """The pool-wide job list, about once a second."""
        while not self.done.is_set():
            await self.request(http, "video-list", "GET", "/v1/videos?limit=20")
            await trio.sleep(self.rng.uniform(0.7, 1.3))

    # ---- the trainer: refits and sleeps -------------------------------------------------

    def control_schedule(self) -> list[tuple[float, str]]:
        events = []
        t = REFIT_FIRST_S
        while t < self.duration - 5:
            events.append((t, "refit"))
            t += REFIT_EVERY_S
        t = SLEEP_FIRST_S
        while t + SLEEP_HOLD_S + 5 < self.duration:
            events.append((t, "sleep"))
            t += SLEEP_EVERY_S
        return sorted(events)

    async def controller(self, http: httpx.AsyncClient) -> None:
        """Refits and sleeps one after another, as one trainer would send them: a refit due
        during a sleep waits for the wake."""
        step = 0
        for at, action in self.control_schedule():
            await self.until(at)
            if self.done.is_set():
                return
            if action == "refit":
                step += 1
                await self.refit(http, step)
            else:
                await self.sleep_pool(http)

    async def until(self, at: float) -> None:
        with trio.move_on_after(max(0.0, at - self.now())):
            await self.done.wait()

    async def admin(
        self, http: httpx.AsyncClient, path: str, body: dict[str, Any] | None = None
    ) -> tuple[float, float, int, Any]:
        """One control call; its `x-request-id` (soak-admin-N) finds it in the router's log."""
        sent = self.now()
        headers = {"x-request-id": f"soak-admin-{next(self.ids):07d}"}
        try:
            response = await http.post(
                self.router_url + path, json=body or {}, headers=headers, timeout=600
            )
            status, payload = response.status_code, response.json()
        except (httpx.HTTPError, ValueError) as exc:
            status, payload = 0, {"error": f"{type(exc).__name__}: {exc}"}
        return sent, self.now(), status, payload

    async def refit(self, http: httpx.AsyncClient, step: int) -> None:
        model_path, version = f"sim/step-{step}", f"v{step}"
        body = {"model_path": model_path, "weight_version": version}
        sent, done, status, answer = await self.admin(http, "/update_weights_from_disk", body)
        committed = status == 200 and answer.get("version") == version
        self.timeline.refits.append(
            {
                "step": step,
                "sent": sent,
                "done": done,
                "status": status,
                "committed": committed,
                "success": answer.get("success"),
                "stale_workers": answer.get("stale_workers"),
                "message": answer.get("message") or answer.get("error"),
                "confirmed": sum(r.get("status_code") == 200 for r in answer.get("results") or []),
            }
        )

    async def sleep_pool(self, http: httpx.AsyncClient) -> None:
        release_sent, release_done, release_status, released = await self.admin(
            http, "/release_memory_occupation"
        )
        self.asleep = True
        awake = await self.watch_workers_asleep(http, release_done + SLEEP_HOLD_S)
        resume_sent, resume_done, resume_status, resumed = await self.admin(
            http, "/resume_memory_occupation"
        )
        self.asleep = False
        self.timeline.sleeps.append(
            {
                "release_sent": release_sent,
                "release_done": release_done,
                "release_status": release_status,
                "released": sum(r.get("status_code") == 200 for r in released.get("results", [])),
                "resume_sent": resume_sent,
                "resume_done": resume_done,
                "resume_status": resume_status,
                "resumed": sum(r.get("status_code") == 200 for r in resumed.get("results", [])),
                "awake_samples": awake,
            }
        )

    async def watch_workers_asleep(self, http: httpx.AsyncClient, until: float) -> list[list[Any]]:
        """While the pool sleeps, ask every simulated worker itself (`/_sim/state`, not the
        router) once a second whether it is awake: a worker process that is up and awake
        holds GPU memory the trainer expects free. Returns [time, worker, started_at] of
        each awake sighting (started_at: when that process printed its listening line)."""
        awake: list[list[Any]] = []
        while self.now() < until:
            for index in range(WORKERS):
                try:
                    state = (
                        await http.get(f"http://{self.name(index)}/_sim/state", timeout=1.0)
                    ).json()
                except (httpx.HTTPError, ValueError):
                    continue
                if not state.get("sleeping"):
                    awake.append([self.now(), self.name(index), self.started[index]])
            with trio.move_on_after(min(1.0, max(0.0, until - self.now()))):
                await trio.sleep_forever()
        return awake

    # ---- faults: kills and one stop -----------------------------------------------------

    def fault_schedule(self) -> list[tuple[float, str, int]]:
        """(time, "kill" or "stop", worker index): kills round-robin, the stop on a worker
        that no kill touches within a minute of it."""
        events = []
        k = 0
        while (at := KILL_EVERY_S * k + KILL_PHASE_S[k % len(KILL_PHASE_S)]) < self.duration - 20:
            events.append((at, "kill", k % WORKERS))
            k += 1
        stop_at = STOP_AT_S if self.duration >= 2 * STOP_AT_S else self.duration / 2
        near = {i for at, _, i in events if abs(at - stop_at) < 60}
        victim = next(i for i in range(WORKERS) if i not in near)
        if stop_at + STOP_FOR_S < self.duration - 10:
            events.append((stop_at, "stop", victim))
        return sorted(events)

    async def faults(self, http: httpx.AsyncClient) -> None:
        async with trio.open_nursery() as nursery:
            kills = 0
            for at, action, index in self.fault_schedule():
                await self.until(at)
                if self.done.is_set():
                    return
                if action == "kill":
                    delay = RESTART_DELAY_S[kills % len(RESTART_DELAY_S)]
                    kills += 1
                    nursery.start_soon(self.kill, http, index, delay)
                else:
                    nursery.start_soon(self.stop, http, index)

    async def kill(self, http: httpx.AsyncClient, index: int, delay: float) -> None:
        """SIGKILL a worker, restart it on the same port after `delay`, and wait until the
        router lists it healthy again (the end of this fault's window)."""
        name = f"worker{index}"
        record: dict[str, Any] = {"worker": self.name(index), "delay_s": delay}
        record["pid"] = self.procs.kill(name)
        record["killed_at"] = self.now()
        record["pool_asleep_at_kill"] = self.asleep
        self.timeline.kills.append(record)
        await trio.sleep(delay)
        record["new_pid"] = await self.start_worker(index)
        record["restarted_at"] = self.now()
        record["healthy_at"] = await self.wait_healthy(http, self.name(index))

    async def stop(self, http: httpx.AsyncClient, index: int) -> None:
        """SIGSTOP a worker for `STOP_FOR_S`, then SIGCONT; wait until it is healthy again."""
        name = f"worker{index}"
        record: dict[str, Any] = {"worker": self.name(index), "stopped_at": self.now()}
        self.timeline.stops.append(record)
        self.procs.signal(name, signal.SIGSTOP)
        try:
            await trio.sleep(STOP_FOR_S)
        finally:
            self.procs.signal(name, signal.SIGCONT)
        record["continued_at"] = self.now()
        record["healthy_at"] = await self.wait_healthy(http, self.name(index))

    async def wait_healthy(
        self, http: httpx.AsyncClient, worker: str, timeout_s: float = 120
    ) -> float | None:
        """When `GET /workers` first shows `worker` healthy (routable), or None."""
        with trio.move_on_after(timeout_s):
            while True:
                try:
                    listing = (await http.get(f"{self.router_url}/workers")).json()
                    for entry in listing["workers"]:
                        if entry["display_id"] == worker and entry["state"] == "healthy":
                            return self.now()
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                await trio.sleep(0.25)
        return None

    # ---- observation ------------------------------------------------------------------

    async def monitor(self, http: httpx.AsyncClient) -> None:
        """The router's view every 0.5 s (for the investigation) and its RSS/fds every 10 s."""
        last_resources = -1e9
        while not self.done.is_set():
            try:
                listing = (await http.get(f"{self.router_url}/workers")).json()
                states = {w["display_id"]: w["state"] for w in listing["workers"]}
                sample = {
                    "t": self.now(),
                    "states": states,
                    "weights": {w["display_id"]: w["weight_version"] for w in listing["workers"]},
                    "target": listing["target_version"],
                    "pool_sleeping": listing["pool_sleeping"],
                    "queued": listing["queued"],
                    "in_flight": sum(w["active_requests"] for w in listing["workers"]),
                }
                if states != self.states or not self.samples:
                    self.samples.append(sample)
                    self.states = states
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if self.now() - last_resources >= 10:
                last_resources = self.now()
                self.resources.append(self.measure())
            with trio.move_on_after(0.5):
                await self.done.wait()

    def measure(self) -> dict[str, float]:
        return {
            "t": self.now(),
            "rss_mib": round(rss_mib(self.router_pid), 2),
            "fds": fd_count(self.router_pid),
        }

    # ---- the run ----------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Start everything, run the traffic for the set time, stop, check; bounded."""
        with trio.fail_after(self.duration + HARD_LIMIT_EXTRA_S):
            return await self._run()

    async def _run(self) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=32)
        timeout = httpx.Timeout(CLIENT_TIMEOUT_S, connect=5)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
            for index in range(WORKERS):
                await self.start_worker(index)
            await self.start_router()
            await self.wait_pool(http, WORKERS)
            start = self.measure()
            self.t0 = time.monotonic()
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(self.image_client, http, "b64_json")
                for _ in range(3):
                    nursery.start_soon(self.image_client, http, "url")
                for _ in range(3):
                    nursery.start_soon(self.video_client, http)
                for _ in range(2):
                    nursery.start_soon(self.list_client, http)
                nursery.start_soon(self.monitor, http)
                nursery.start_soon(self.controller_then_faults, http)
                await trio.sleep(self.duration)
                self.done.set()
            traffic_s = self.now()
            # Kills and stops finished inside the nursery; let the router settle.
            settled = await self.settle(http)
            end = self.measure()
        return self.report(start, end, traffic_s, settled)

    async def controller_then_faults(self, http: httpx.AsyncClient) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.controller, http)
            nursery.start_soon(self.faults, http)

    async def settle(self, http: httpx.AsyncClient) -> dict[str, Any]:
        """Wait (≤ 30 s) until the router has nothing in flight or queued."""
        health: dict[str, Any] = {}
        with trio.move_on_after(30):
            while True:
                try:
                    health = (await http.get(f"{self.router_url}/health")).json()
                except (httpx.HTTPError, ValueError):
                    health = {}
                if health and not health.get("in_flight") and not health.get("queued"):
                    break
                await trio.sleep(0.5)
        return health

    # ---- checks -----------------------------------------------------------------------

    def windows(self, end: float) -> list[Window]:
        windows = []
        for kill in self.timeline.kills:
            healthy = kill.get("healthy_at") or end
            windows.append(
                Window("kill", kill["killed_at"], healthy + WINDOW_SLACK_S, kill["worker"])
            )
        for stop in self.timeline.stops:
            back = max(
                (stop.get("continued_at") or end) + BREAKER_OPEN_S, stop.get("healthy_at") or end
            )
            back += WINDOW_SLACK_S
            windows.append(Window("stop", stop["stopped_at"], back, stop["worker"]))
        for sleep in self.timeline.sleeps:
            windows.append(
                Window("sleep", sleep["release_sent"], sleep["resume_done"] + WINDOW_SLACK_S)
            )
        return windows

    def report(
        self, start: dict[str, float], end: dict[str, float], traffic_s: float, settled: Any
    ) -> dict[str, Any]:
        answers = self.answers
        windows = self.windows(traffic_s)
        committed = sorted((r["done"], r["step"]) for r in self.timeline.refits if r["committed"])

        def floor(sent: float) -> int:
            """The refit that had answered before `sent` (0: none yet)."""
            return max((step for done, step in committed if done < sent), default=0)

        stale, unnamed, older_reads = [], [], []
        for a in answers:
            if not 200 <= a.status < 300 or a.kind == "video-list":
                continue
            index = weight_index(a.weights)
            if a.kind in GENERATIONS:
                if index is None:
                    unnamed.append(a)
                elif index < floor(a.sent):
                    stale.append(a)
            elif index is not None and index < floor(a.sent):
                older_reads.append(a)

        asleep = [
            (s["release_done"], s["resume_sent"])
            for s in self.timeline.sleeps
            if s["release_status"] == 200
        ]
        served_asleep = [
            a
            for a in answers
            if a.kind in GENERATIONS
            and 200 <= a.status < 300
            and any(lo < a.done < hi for lo, hi in asleep)
        ]
        awake_while_asleep = [
            {"t": t, "worker": worker, "process_started": started, "release_done": lo}
            for sleep in self.timeline.sleeps
            if sleep["release_status"] == 200
            for lo in [sleep["release_done"]]
            for t, worker, started in sleep["awake_samples"]
            if t - max(lo, started) > AWAKE_GRACE_S
        ]
        queued_through_sleep = [
            a
            for a in answers
            if a.kind in GENERATIONS
            and 200 <= a.status < 300
            and any(lo < a.sent < hi for lo, hi in asleep)
        ]

        kills = [(k["worker"], k["killed_at"]) for k in self.timeline.kills]
        labels: Counter[str] = Counter()
        outside, no_json, sleep_other, no_retry_after = [], [], [], []
        detail_only: Counter[str] = Counter()
        for a in answers:
            if 200 <= a.status < 300:
                continue
            label = self.label(a, windows, kills)
            labels[label] += 1
            if label == "outside":
                outside.append(a)
            if label == "sleep_other":
                sleep_other.append(a)
            if a.status == 503 and "pool is asleep" in (a.error or "") and not a.retry_after:
                no_retry_after.append(a)
            if a.status and a.json_detail:
                detail_only[f"{a.status} {a.kind} ({label})"] += 1
            elif a.status and not a.json_error:
                no_json.append(a)

        by_kind: dict[str, Counter[str]] = defaultdict(Counter)
        latency: dict[str, list[float]] = defaultdict(list)
        per_worker: Counter[str] = Counter()
        for a in answers:
            by_kind[a.kind]["total"] += 1
            by_kind[a.kind]["2xx" if 200 <= a.status < 300 else f"{a.status}"] += 1
            if 200 <= a.status < 300:
                latency[a.kind].append((a.done - a.sent) * 1000)
                if a.kind in GENERATIONS and a.worker:
                    per_worker[a.worker] += 1

        checks = {
            "stale_answers": len(stale),
            "served_while_asleep": len(served_asleep),
            "worker_awake_while_pool_asleep": len(
                {(a["worker"], a["release_done"]) for a in awake_while_asleep}
            ),
            "non2xx_outside_fault_windows": len(outside),
            "non2xx_without_json_reason": len(no_json),
            "sleep_window_non2xx_other_than_pool_asleep": len(sleep_other),
            "generations_without_weights_header": len(unnamed),
        }
        rss_values = [r["rss_mib"] for r in self.resources]
        summary = {
            "ok": not any(checks.values()),
            "checks": checks,
            "minutes": round(traffic_s / 60, 2),
            "out_dir": str(self.out),
            "router_log": str(self.out / "router.log"),
            "requests": {
                "total": len(answers),
                "per_second": round(len(answers) / max(traffic_s, 1), 1),
                "by_kind": {k: dict(v) for k, v in sorted(by_kind.items())},
                "generations_per_worker": dict(sorted(per_worker.items())),
            },
            "latency_ms": {
                kind: {
                    "p50": round(percentile(values, 50), 1),
                    "p99": round(percentile(values, 99), 1),
                    "max": round(max(values), 1),
                }
                for kind, values in sorted(latency.items())
            },
            "non2xx": {
                "total": sum(labels.values()),
                "by_window": dict(labels),
                "transport_errors": sum(a.status == 0 for a in answers),
                "pool_asleep_503_without_retry_after": len(no_retry_after),
                "worker_json_detail_passed_through": dict(detail_only),
            },
            "info": {
                "reads_answered_by_older_weights": len(older_reads),
                "generations_sent_while_asleep_answered_2xx": len(queued_through_sleep),
                "videos": dict(self.video_outcomes),
                "video_failures": dict(self.video_failures),
            },
            "timeline": {
                "refits": {
                    "sent": len(self.timeline.refits),
                    "committed": len(committed),
                    "not_fully_successful": [
                        {k: r[k] for k in ("step", "done", "status", "stale_workers", "message")}
                        for r in self.timeline.refits
                        if not r["success"]
                    ],
                    "max_s": max(
                        (round(r["done"] - r["sent"], 2) for r in self.timeline.refits),
                        default=None,
                    ),
                },
                "sleeps": self.timeline.sleeps,
                "kills": self.timeline.kills,
                "stops": self.timeline.stops,
            },
            "router": {
                "rss_mib_start": start["rss_mib"],
                "rss_mib_end": end["rss_mib"],
                "rss_mib_max": max(rss_values, default=None),
                "fds_start": start["fds"],
                "fds_end": end["fds"],
                "fds_max": max((r["fds"] for r in self.resources), default=None),
                "in_flight_end": settled.get("in_flight"),
                "queued_end": settled.get("queued"),
            },
            "examples": {
                "stale": [asdict(a) for a in stale[:10]],
                "served_while_asleep": [asdict(a) for a in served_asleep[:10]],
                "awake_while_pool_asleep": awake_while_asleep[:10],
                "outside_fault_windows": [asdict(a) for a in outside[:10]],
                "without_json_reason": [asdict(a) for a in no_json[:10]],
                "sleep_window_other": [asdict(a) for a in sleep_other[:10]],
            },
        }
        return summary

    @staticmethod
    def label(a: Answer, windows: Iterable[Window], kills: list[tuple[str, float]]) -> str:
        """Which fault explains a non-2xx answer, by the windows its lifetime overlaps.

        "sleep" only for the expected 503 "pool is asleep"; a kill or stop window excuses
        any answer (failover and breakers move traffic between workers); a job read whose
        owner was killed after creating it is "job_lost" (the new process has no such job);
        another non-2xx inside a sleep window is "sleep_other", anything else "outside".
        """
        overlapping = {w.kind for w in windows if a.sent <= w.end and a.done >= w.start}
        if "sleep" in overlapping and a.status == 503 and "pool is asleep" in (a.error or ""):
            return "sleep"
        for kind in ("kill", "stop"):
            if kind in overlapping:
                return kind
        created = a.job_created
        if created is not None and any(
            w == a.job_owner and created < at <= a.done for w, at in kills
        ):
            return "job_lost"
        return "sleep_other" if "sleep" in overlapping else "outside"

    def save(self, summary: dict[str, Any] | None) -> None:
        """Every answer, the router's view and the timeline, for the investigation."""
        with (self.out / "answers.jsonl").open("w") as sink:
            for a in self.answers:
                sink.write(json.dumps(asdict(a)) + "\n")
        with (self.out / "router_view.jsonl").open("w") as sink:
            for sample in self.samples:
                sink.write(json.dumps(sample) + "\n")
        (self.out / "timeline.json").write_text(json.dumps(asdict(self.timeline), indent=1))
        if summary is not None:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="traffic time (default 10)")
    parser.add_argument("--out", type=Path, help="directory for logs and records")
    parser.add_argument("--seed", type=int, default=22)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="dsrouter-soak-"))
    out.mkdir(parents=True, exist_ok=True)
    soak = Soak(args.minutes, out, args.seed)
    print(f"soak: {args.minutes:g} min, logs in {out}", file=sys.stderr, flush=True)
    summary: dict[str, Any] | None = None
    try:
        summary = trio.run(soak.run)
    finally:
        code = soak.procs.stop("router", 40.0)
        soak.procs.stop_all()
        if summary is not None:
            summary["router"]["exit_status"] = code
        soak.save(summary)
    print(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
