"""The fault suite: real routers, real simulated workers, real failures (loopback only).

Each test bounds itself in time and counts; the mixed run prints its figures.
"""

import contextlib
import json
import os
import signal
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.support import (
    SimWorker,
    healthy,
    routed_pool,
    router_process,
    start_simworker,
    wait_until,
    worker_state,
)

CONFIG = """
[health]
interval_s = 0.25
timeout_s = 1.0
failure_threshold = 2
breaker_open_s = 30
[routing]
retry_backoff_s = 0.01
[timeouts]
job_s = 3
"""
INSTANT = ("--sec-per-mpx-step", "0")
IMAGE = {"prompt": "p", "size": "16x16", "response_format": "url"}


async def sim_faults(http: httpx.AsyncClient, url: str, **faults: object) -> None:
    response = await http.post(f"{url}/_sim/faults", json=faults)
    assert response.status_code == 200, response.text


async def in_flight(http: httpx.AsyncClient, router: str) -> int:
    workers = (await http.get(f"{router}/workers")).json()["workers"]
    return sum(w["active_requests"] for w in workers)


async def test_sigkill_between_requests_costs_no_request(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[INSTANT] * 3, config=CONFIG) as router:
        workers = router.workers
        await workers[0].kill()
        statuses = Counter()
        for _ in range(60):
            answer = await http.post(f"{router.url}/v1/images/generations", json=IMAGE)
            statuses[answer.status_code] += 1
        assert statuses == {200: 60}
        assert await in_flight(http, router.url) == 0


async def test_sigkill_mid_request_is_retried_on_another_worker(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """The killed worker sent no answer byte, so the request is replayed elsewhere."""
    async with routed_pool(
        http,
        tmp_path,
        ("--sec-per-mpx-step", "50"),
        INSTANT,
        args=["--routing-algorithm", "round-robin"],
        config=CONFIG,
    ) as router:
        slow, fast = router.workers
        answers: list[httpx.Response] = []

        async def request() -> None:
            answers.append(
                await http.post(
                    f"{router.url}/v1/images/generations", json={**IMAGE, "size": "512x512"}
                )
            )

        async with trio.open_nursery() as inner:
            for _ in range(2):
                inner.start_soon(request)

            async def slow_busy() -> bool:
                state = (await http.get(f"{slow.url}/_sim/state")).json()
                return state["in_flight"] >= 1

            await wait_until(slow_busy)
            os.kill(slow.pid, signal.SIGKILL)
        assert [a.status_code for a in answers] == [200, 200]
        fast_name = fast.url.removeprefix("http://")
        assert all(a.headers["x-dsrouter-worker"] == fast_name for a in answers)
        assert sorted(a.headers["x-dsrouter-attempts"] for a in answers) == ["1", "2"]
        assert await in_flight(http, router.url) == 0


async def test_worker_dying_mid_answer_is_replayed_until_the_client_saw_a_byte(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A create answer is read before it is relayed, so its loss is invisible to the client;
    an image answer already streaming to the client can only be cut."""
    async with routed_pool(
        http,
        tmp_path,
        ("--task-type", "T2V", *INSTANT),
        ("--task-type", "T2I,T2V", *INSTANT),
        args=["--routing-algorithm", "round-robin"],
        config=CONFIG,
    ) as router:
        dying, spare = router.workers
        await sim_faults(http, dying.url, exit_after=1)
        attempts = []
        for _ in range(2):
            job = await http.post(f"{router.url}/v1/videos", json={"prompt": "p"})
            assert job.status_code == 200, job.text
            attempts.append(job.headers["x-dsrouter-attempts"])
            status = await http.get(f"{router.url}/v1/videos/{job.json()['id']}")
            assert status.status_code == 200
        assert "2" in attempts, attempts
        await sim_faults(http, spare.url, exit_after=1)
        cut = None
        with contextlib.suppress(httpx.HTTPError):
            cut = await http.post(f"{router.url}/v1/images/generations", json=IMAGE)
        assert cut is None or cut.status_code >= 500
        with trio.fail_after(10):
            assert await spare.process.wait() == 3, "the worker died mid-answer"
        assert await in_flight(http, router.url) == 0


async def test_hung_worker_gives_504_and_frees_its_lease(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(
        http, tmp_path, ("--task-type", "T2V", *INSTANT), config=CONFIG
    ) as router:
        [worker] = router.workers
        await sim_faults(http, worker.url, hang_rate=1.0)
        answer = await http.post(f"{router.url}/v1/videos", json={"prompt": "p"})
        assert answer.status_code == 504 and "did not answer" in answer.json()["error"]
        assert await in_flight(http, router.url) == 0


async def _burst_until_dead(
    http: httpx.AsyncClient, router: str, bad: SimWorker, good: SimWorker
) -> None:
    """Send generations until the failing worker is dead; only it may fail them.

    The worker answers 503 (`unavailable_rate`): what passive health counts (a plain-text
    500 is how a worker reports a failed generation, often the request's own fault)."""
    served: Counter = Counter()
    for _ in range(40):
        answer = await http.post(f"{router}/v1/images/generations", json=IMAGE)
        served[(answer.status_code, answer.headers.get("x-dsrouter-worker"))] += 1
        if (await worker_state(http, router, bad.url))["is_dead"]:
            break
    assert (await worker_state(http, router, bad.url))["is_dead"], served
    assert set(served) <= {
        (503, bad.url.removeprefix("http://")),
        (200, good.url.removeprefix("http://")),
    }, served


async def _all_served_by(http: httpx.AsyncClient, router: str, worker: SimWorker) -> None:
    after: Counter = Counter()
    for _ in range(20):
        answer = await http.post(f"{router}/v1/images/generations", json=IMAGE)
        after[(answer.status_code, answer.headers.get("x-dsrouter-worker"))] += 1
    assert after == {(200, worker.url.removeprefix("http://")): 20}, after


async def test_503_burst_opens_the_breaker_and_traffic_moves_away(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    # No recovery by probes during the test: what moves traffic away is the breaker alone.
    config = CONFIG.replace(
        "failure_threshold = 2", "failure_threshold = 2\nrecovery_threshold = 1000"
    )
    async with routed_pool(http, tmp_path, INSTANT, INSTANT, config=config) as router:
        bad, good = router.workers
        await sim_faults(http, bad.url, unavailable_rate=1.0)
        await _burst_until_dead(http, router.url, bad, good)
        await _all_served_by(http, router.url, good)


async def test_good_probes_do_not_close_a_breaker_opened_by_failed_requests(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A worker whose /health stays 200 while every generation fails: its probes cannot
    tell, so once request failures open its breaker it must stay out of rotation for
    `breaker_open_s` (30 s here), however many good probes it answers meanwhile (README,
    "Failover and breaker")."""
    async with routed_pool(http, tmp_path, INSTANT, INSTANT, config=CONFIG) as router:
        bad, good = router.workers
        await sim_faults(http, bad.url, unavailable_rate=1.0)
        await _burst_until_dead(http, router.url, bad, good)
        probes: set[float] = set()

        async def probed_thrice() -> bool:
            """Three more probe rounds answered: more than recovery_threshold (2)."""
            probes.add((await worker_state(http, router.url, bad.url))["last_probe_at"])
            return len(probes) > 3

        await wait_until(probed_thrice)
        assert (await worker_state(http, router.url, bad.url))["is_dead"] is True
        await _all_served_by(http, router.url, good)


async def test_truncated_and_slow_bodies(tmp_path: Path, http: httpx.AsyncClient) -> None:
    async with routed_pool(
        http,
        tmp_path,
        ("--task-type", "T2V", *INSTANT, "--video-bytes", str(256 * 1024)),
        config=CONFIG,
    ) as router:
        [worker] = router.workers
        job = (await http.post(f"{router.url}/v1/videos", json={"prompt": "p"})).json()

        async def done() -> bool:
            answer = await http.get(f"{router.url}/v1/videos/{job['id']}")
            return answer.json()["status"] == "completed"

        await wait_until(done)
        await sim_faults(http, worker.url, slow_body_bps=512 * 1024)
        dripped = await http.get(f"{router.url}/v1/videos/{job['id']}/content")
        assert dripped.status_code == 200 and len(dripped.content) == 256 * 1024
        await sim_faults(http, worker.url, slow_body_bps=0, exit_after=1)
        try:
            truncated = await http.get(f"{router.url}/v1/videos/{job['id']}/content")
        except httpx.HTTPError:
            truncated = None
        assert (
            truncated is None or truncated.status_code >= 500 or len(truncated.content) < 256 * 1024
        )
        await wait_until(lambda: _zero_in_flight(http, router.url))


async def _zero_in_flight(http: httpx.AsyncClient, router: str) -> bool:
    return await in_flight(http, router) == 0


async def _video_job(http: httpx.AsyncClient, router: str) -> str:
    """A completed video job's id (instant workers finish it in one poll or two)."""
    job = await http.post(f"{router}/v1/videos", json={"prompt": "p"})
    assert job.status_code == 200, job.text
    video_id = job.json()["id"]

    async def done() -> bool:
        answer = await http.get(f"{router}/v1/videos/{video_id}")
        return answer.json()["status"] == "completed"

    await wait_until(done)
    return video_id


async def _sim_in_flight(http: httpx.AsyncClient, worker_url: str) -> int:
    """Requests the simulated worker itself is still serving (its own count, not ours)."""
    return (await http.get(f"{worker_url}/_sim/state")).json()["in_flight"]


async def test_worker_stalling_mid_body_is_cut_after_idle_read_s_and_frees_its_lease(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """At `slow_body_bps = 512` the worker sends a KiB every 2 s (the whole file would take
    over 8 minutes): each pause is 4x `timeouts.idle_read_s`, so the router must give up
    on the worker and cut the client's response (which already has the 200 and the first
    bytes), release the lease and close the worker's connection. The simulated worker
    (hypercorn) notices that closed connection at its next write, 2-4 s later, instead
    of dripping on for minutes."""
    size = 256 * 1024
    idle_read_s = 0.5
    config = CONFIG.replace("job_s = 3", f"job_s = 3\nidle_read_s = {idle_read_s}")
    async with routed_pool(
        http, tmp_path, ("--task-type", "T2V", *INSTANT, "--video-bytes", str(size)), config=config
    ) as router:
        [worker] = router.workers
        video_id = await _video_job(http, router.url)
        await sim_faults(http, worker.url, slow_body_bps=512)
        received = 0
        started = trio.current_time()
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream(
                "GET",
                f"{router.url}/v1/videos/{video_id}/content",
            ) as stalled:
                assert stalled.status_code == 200
                async for chunk in stalled.aiter_raw():
                    received += len(chunk)
        assert trio.current_time() - started >= idle_read_s
        assert 0 < received < size, received
        await wait_until(lambda: _zero_in_flight(http, router.url), timeout_s=10)

        async def worker_idle() -> bool:
            return await _sim_in_flight(http, worker.url) == 0

        await wait_until(worker_idle, timeout_s=15)
        await sim_faults(http, worker.url, slow_body_bps=0)
        whole = await http.get(f"{router.url}/v1/videos/{video_id}/content")
        assert whole.status_code == 200 and len(whole.content) == size


async def test_client_disconnect_mid_download_releases_the_worker(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """64 MiB is far more than the socket buffers between worker, router and client hold,
    so while the client reads nothing more the download is stuck halfway: the worker is
    still serving it when the client hangs up, and must be told at once."""
    size = 64 << 20
    async with routed_pool(
        http, tmp_path, ("--task-type", "T2V", *INSTANT, "--video-bytes", str(size)), config=CONFIG
    ) as router:
        [worker] = router.workers
        video_id = await _video_job(http, router.url)
        # A raw socket: an httpx stream left early leaves async generators unfinished.
        host, port = router.url.removeprefix("http://").split(":")
        client = await trio.open_tcp_stream(host, int(port))
        await client.send_all(
            f"GET /v1/videos/{video_id}/content HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        received = b""
        while len(received) < 1 << 20:
            chunk = await client.receive_some(1 << 16)
            assert chunk, "the router closed the download"
            received += chunk
        head = received.split(b"\r\n\r\n", 1)[0].decode().lower()
        assert head.startswith("http/1.1 200") and f"content-length: {size}" in head
        assert await in_flight(http, router.url) == 1
        assert await _sim_in_flight(http, worker.url) == 1
        await client.aclose()
        assert len(received) < size

        async def released() -> bool:
            return (
                await in_flight(http, router.url) == 0
                and await _sim_in_flight(http, worker.url) == 0
            )

        await wait_until(released, timeout_s=10)
        ranged = await http.get(
            f"{router.url}/v1/videos/{video_id}/content", headers={"range": "bytes=0-1023"}
        )
        assert ranged.status_code == 206 and len(ranged.content) == 1024


# The router answers 413 before httpx has sent the whole body; httpx then leaves its body
# generator unfinished, which Python reports as an unraisable ResourceWarning on the client.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_bad_inputs_get_clear_errors_and_harm_nothing(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = CONFIG + "[server]\nmax_body_mb = 1\n"
    async with routed_pool(http, tmp_path, INSTANT, config=config) as router:
        malformed = await http.post(
            f"{router.url}/v1/images/generations",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert 400 <= malformed.status_code < 500
        # `connection: close`: the router closes a connection whose body it refused
        # without saying so (see the next test), so httpx must not reuse it.
        once = {"connection": "close"}
        big = await http.post(
            f"{router.url}/v1/images/edits", content=b"x" * (2 << 20), headers=once
        )
        assert big.status_code == 413 and "1 MiB" in big.json()["error"]

        async def chunked():
            for _ in range(3):
                yield b"y" * (1 << 20)

        big_chunked = await http.post(
            f"{router.url}/v1/images/edits", content=chunked(), headers=once
        )
        assert big_chunked.status_code == 413
        bad_multipart = await http.post(
            f"{router.url}/v1/images/edits",
            content=b"--x\r\nnonsense",
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert 400 <= bad_multipart.status_code < 500
        undecodable = await http.get(f"{router.url}/workers/%C3%28")
        assert undecodable.status_code == 400
        ok = await http.post(f"{router.url}/v1/images/generations", json=IMAGE)
        assert ok.status_code == 200
        assert await in_flight(http, router.url) == 0


async def test_an_early_413_tells_the_client_the_connection_closes(tmp_path: Path) -> None:
    config = CONFIG + "[server]\nmax_body_mb = 1\n"
    async with router_process([], config=config, tmp_path=tmp_path) as router:
        host, port = router.url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        with trio.fail_after(10):
            await stream.send_all(
                b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\n"
                b"Content-Length: 2097152\r\n\r\n" + b"x" * 65536
            )
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = await stream.receive_some(65536)
                assert chunk, answer
                answer += chunk
            await stream.aclose()
        head = answer.split(b"\r\n\r\n", 1)[0].lower()
        assert head.startswith(b"http/1.1 413")
        assert b"\r\nconnection: close" in head, head


async def test_client_disconnect_mid_upload_releases_everything(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, INSTANT, config=CONFIG) as router:
        [worker] = router.workers
        host, port = router.url.removeprefix("http://").split(":")
        stream = await trio.open_tcp_stream(host, int(port))
        await stream.send_all(
            b"POST /v1/images/edits HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 100000000\r\n\r\n" + b"z" * (4 << 20)
        )

        async def busy() -> bool:
            return await in_flight(http, router.url) == 1

        await wait_until(busy)
        await stream.aclose()
        await wait_until(lambda: _zero_in_flight(http, router.url), timeout_s=10)

        async def worker_idle() -> bool:
            return (await http.get(f"{worker.url}/_sim/state")).json()["in_flight"] == 0

        await wait_until(worker_idle, timeout_s=10)


async def test_sleep_during_traffic_loses_no_accepted_request(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = CONFIG.replace(
        "retry_backoff_s = 0.01", "retry_backoff_s = 0.01\nqueue_while_asleep = true"
    )
    async with routed_pool(
        http, tmp_path, *[("--sec-per-mpx-step", "0.5")] * 2, config=config
    ) as router:
        statuses: Counter = Counter()

        async def client() -> None:
            for _ in range(10):
                answer = await http.post(
                    f"{router.url}/v1/images/generations", json={**IMAGE, "size": "64x64"}
                )
                statuses[answer.status_code] += 1

        async with trio.open_nursery() as traffic:
            for _ in range(4):
                traffic.start_soon(client)
            await wait_until(lambda: _some_served(statuses))
            slept = await http.post(f"{router.url}/release_memory_occupation")
            assert slept.status_code == 200
            woke = await http.post(f"{router.url}/resume_memory_occupation")
            assert woke.status_code == 200
        assert statuses == {200: 40}, statuses


async def _some_served(statuses: Counter) -> bool:
    return sum(statuses.values()) >= 4


async def _settle(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    """Poll `check` until it holds or `timeout_s` passes, without failing: the caller
    measures and prints what it finds, then asserts."""
    with trio.move_on_after(timeout_s):
        while not await check():  # noqa: ASYNC110 - polling other processes
            await trio.sleep(0.05)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# The mixed run's requests, on workers at 1 s per megapixel-step (the simulated workers run
# one generation at a time, as a GPU does, so each has a queue): most images take ~8 ms of
# "GPU" time, some ~160 ms, and a video job ~130 ms before its 512 KiB file can be fetched.
# Killed workers are then in the middle of several requests, queued ones included.
VIDEO_BYTES = 512 * 1024
MIXED_WORKER = (
    "--task-type",
    "T2I,T2V",
    "--sec-per-mpx-step",
    "1",
    "--video-bytes",
    str(VIDEO_BYTES),
)
SMALL_IMAGE = IMAGE
SLOW_IMAGE = {"prompt": "p", "size": "128x128", "num_inference_steps": 10, "response_format": "url"}
VIDEO = {"prompt": "p", "size": "64x64", "seconds": 1, "fps": 8, "num_inference_steps": 4}
MIX = ("small",) * 6 + ("slow",) * 2 + ("video",) * 2
"""What each request index starts; a video is a create, polls until done, and a download."""
POLL_INTERVAL_S = 0.05
"""Pacing of a client's status polls (load shape, not synchronisation)."""


@attrs.frozen
class Outcome:
    """One request of the mixed run, as the client saw it."""

    kind: str
    status: int | None
    """None: no answer head arrived at all."""
    worker: str | None
    """`x-dsrouter-worker`: a worker's answer was relayed. None: the router answered itself
    (or nothing arrived), so no worker's answer reached the client."""
    attempts: int
    complete: bool
    """The whole body arrived (for a download: every byte of the file)."""
    owner: str | None = None
    """For a job's status and file: the worker that created the job."""
    payload: Any = None


def _verdict(outcome: Outcome, killed: set[str]) -> str:
    """Why a request ended as it did.

    The router retries a request on another worker while no byte of an answer has reached
    the client (a killed worker's connection is refused or reset, and every request here
    is small enough to replay). So the only failures a kill may cause are requests for a
    job that lived on the killed worker. A failure without a relayed worker answer is one
    the router gave up on before any worker answered it: it must not happen.
    """
    if outcome.status == 200 and outcome.complete:
        return "succeeded"
    if outcome.owner is not None and outcome.owner in killed:
        return "lost with its worker"
    if outcome.worker is None:
        return "failed before it was sent"
    return "failed after it was sent"


async def test_mixed_run_with_three_workers_killed(tmp_path: Path, http: httpx.AsyncClient) -> None:
    total, concurrency = 2000, 32
    with trio.fail_after(120):
        await _mixed_run(tmp_path, http, total, concurrency)


async def _mixed_run(tmp_path: Path, http: httpx.AsyncClient, total: int, concurrency: int) -> None:
    async with trio.open_nursery() as nursery:
        workers = [await start_simworker(nursery, *MIXED_WORKER) for _ in range(8)]
        async with router_process(
            ["--worker-urls", *[w.url for w in workers], "--log-level", "warning"],
            config=CONFIG + "[logging]\naccess_log = false\n[server]\nkeep_alive_timeout_s = 2\n",
            tmp_path=tmp_path,
        ) as router:
            await healthy(http, router.url, 8)
            fds_before = _open_fds(router.pid)
            outcomes: list[Outcome] = []
            next_index = 0
            victims = {500: workers[1], 1000: workers[4], 1500: workers[6]}
            killed: set[str] = set()
            busy_at_kill: list[int] = []

            async def kill(victim: SimWorker) -> None:
                """SIGKILL a worker while it serves at least two requests."""

                async def busy() -> bool:
                    state = (await http.get(f"{victim.url}/_sim/state")).json()
                    if state["in_flight"] >= 2:
                        busy_at_kill.append(state["in_flight"])
                        return True
                    return False

                await wait_until(busy, timeout_s=10, interval_s=0.005)
                killed.add(victim.url.removeprefix("http://"))
                os.kill(victim.pid, signal.SIGKILL)

            async def send(
                client: httpx.AsyncClient,
                kind: str,
                method: str,
                path: str,
                body: dict | None = None,
                owner: str | None = None,
            ) -> Outcome:
                nonlocal next_index
                if next_index in victims:
                    nursery.start_soon(kill, victims[next_index])
                next_index += 1
                status = worker = None
                attempts, complete, data = 0, False, b""
                try:
                    async with client.stream(method, router.url + path, json=body) as answer:
                        status = answer.status_code
                        worker = answer.headers.get("x-dsrouter-worker")
                        attempts = int(answer.headers.get("x-dsrouter-attempts", "0"))
                        async for chunk in answer.aiter_bytes():
                            data += chunk
                        complete = kind != "video-content" or len(data) == VIDEO_BYTES
                except httpx.TransportError:
                    pass
                payload = (
                    json.loads(data)
                    if complete and status == 200 and kind not in ("video-content",)
                    else None
                )
                if kind == "video-poll" and payload is not None:
                    complete = payload["status"] != "failed"
                outcome = Outcome(kind, status, worker, attempts, complete, owner, payload)
                outcomes.append(outcome)
                return outcome

            async def video(client: httpx.AsyncClient) -> None:
                created = await send(client, "video-create", "POST", "/v1/videos", VIDEO)
                if _verdict(created, killed) != "succeeded":
                    return
                job = f"/v1/videos/{created.payload['id']}"
                while True:
                    polled = await send(client, "video-poll", "GET", job, owner=created.worker)
                    if (
                        _verdict(polled, killed) != "succeeded"
                        or polled.payload["status"] == "completed"
                    ):
                        break  # a job that failed is a poll that failed
                    await trio.sleep(POLL_INTERVAL_S)
                if polled.payload is not None and polled.payload["status"] == "completed":
                    await send(
                        client, "video-content", "GET", f"{job}/content", owner=created.worker
                    )

            async def client(limits: httpx.AsyncClient) -> None:
                while next_index < total:
                    kind = MIX[next_index % len(MIX)]
                    if kind == "video":
                        await video(limits)
                    else:
                        await send(
                            limits,
                            f"{kind} image",
                            "POST",
                            "/v1/images/generations",
                            SMALL_IMAGE if kind == "small" else SLOW_IMAGE,
                        )

            async with httpx.AsyncClient(timeout=60) as limits, trio.open_nursery() as load:
                for _ in range(concurrency):
                    load.start_soon(client, limits)

            async def nothing_in_flight() -> bool:
                return await in_flight(http, router.url) == 0

            # A lease is released just after the last byte is sent: allow a moment, then
            # measure (the figures are printed before anything is asserted).
            await _settle(nothing_in_flight, timeout_s=5)
            in_flight_after = await in_flight(http, router.url)
            survivors = [w for w in workers if w.url.removeprefix("http://") not in killed]
            worker_in_flight_after = sum([await _sim_in_flight(http, w.url) for w in survivors])

            # Our clients are closed, pooled upstream connections close once the sweep
            # finds them expired, and those to the killed workers are gone: the run may
            # leave no socket behind (it began with 8 workers to talk to, it ends with 5).
            async def sockets_closed() -> bool:
                return _open_fds(router.pid) <= fds_before

            await _settle(sockets_closed, timeout_s=15)
            fds_after = _open_fds(router.pid)
            sent = len(outcomes)
            answered = sum(o.status is not None for o in outcomes)
            verdicts = Counter(_verdict(o, killed) for o in outcomes)
            failed = Counter(
                o.status or "no answer" for o in outcomes if _verdict(o, killed) != "succeeded"
            )
            retried = sum(o.attempts > 1 for o in outcomes if _verdict(o, killed) == "succeeded")
            kinds = Counter(o.kind for o in outcomes)
            print(
                f"\nmixed run: sent={sent} answered={answered} "
                f"succeeded={verdicts['succeeded']} failed_by_status={dict(failed)} "
                f"lost_with_killed_worker={verdicts['lost with its worker']} "
                f"failed_before_sent={verdicts['failed before it was sent']} "
                f"failed_after_sent={verdicts['failed after it was sent']} "
                f"succeeded_after_retry={retried} in_flight_at_kills={busy_at_kill} "
                f"in_flight_after={in_flight_after} "
                f"worker_in_flight_after={worker_in_flight_after} "
                f"fds_before={fds_before} fds_after={fds_after} kinds={dict(kinds)}"
            )
            assert sent >= total and answered == sent
            assert len(killed) == 3 and len(busy_at_kill) == 3
            assert verdicts["failed before it was sent"] == 0
            assert verdicts["failed after it was sent"] == 0
            assert verdicts["succeeded"] + verdicts["lost with its worker"] == sent
            assert retried >= 1, "no killed worker's request was replayed elsewhere"
            assert in_flight_after == 0 and worker_in_flight_after == 0
            assert fds_after <= fds_before
        nursery.cancel_scope.cancel()
