"""The RL control plane's promises, through a real router process to real simulated workers.

A worker that misses a refit is caught up in the background without anybody asking, and a
checksum-verified pool holds the catch-up to the same checksum. The pool asleep is a "come
back later" on discovery as on inference, every error the router makes is JSON, control
bodies have their own (configurable) size limit, and a weight change reaches the workers as
the exact bytes the trainer sent, tagged with the request's id.
"""

import hashlib
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
import trio

from tests.integration.test_proxy import start_pool
from tests.support import (
    SimWorker,
    healthy,
    routed_pool,
    router_process,
    wait_until,
    worker_state,
)

CONFIG = """
[health]
interval_s = 0.2
timeout_s = 2.0
"""
T2I = ("--task-type", "T2I", "--sec-per-mpx-step", "0")
CATCH_UP_DEADLINE_S = 30.0
"""Catch-up retries back off from 1 s, doubling: enough for the first few attempts."""


async def set_faults(http: httpx.AsyncClient, worker: SimWorker, **faults: object) -> None:
    answer = await http.post(f"{worker.url}/_sim/faults", json=faults)
    assert answer.status_code == 200, answer.text


async def sim_state(http: httpx.AsyncClient, worker: SimWorker) -> dict:
    return (await http.get(f"{worker.url}/_sim/state")).json()


async def test_worker_that_failed_a_refit_is_caught_up_once_the_fault_clears(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[T2I] * 2, config=CONFIG) as router:
        _, laggard = router.workers
        await set_faults(http, laggard, refit_fails=True)
        for step in ("sim/step-1", "sim/step-2"):
            refit = await http.post(
                f"{router.url}/update_weights_from_disk", json={"model_path": step}
            )
            assert refit.status_code == 200
            assert refit.json()["stale_workers"] == [laggard.url]
            assert refit.json()["version"] == step
        assert (await worker_state(http, router.url, laggard.url))["is_stale"] is True

        await set_faults(http, laggard, refit_fails=False)

        async def caught_up() -> bool:
            state = await worker_state(http, router.url, laggard.url)
            return state["weight_version"] == "sim/step-2" and state["state"] == "healthy"

        await wait_until(caught_up, timeout_s=CATCH_UP_DEADLINE_S)
        health = (await http.get(f"{router.url}/health")).json()
        assert health["stale_workers"] == 0 and health["healthy_workers"] == 2
        assert (await sim_state(http, laggard))["model_path"] == "sim/step-2"


async def test_worker_drained_during_a_refit_is_caught_up_when_undrained(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[T2I] * 2, config=CONFIG) as router:
        active, drained = router.workers
        path = f"{router.url}/workers/{quote(drained.url, safe='')}"
        drain = await http.put(path, json={"draining": True, "remove_when_drained": False})
        assert drain.status_code == 200, drain.text
        refit = await http.post(
            f"{router.url}/update_weights_from_disk", json={"model_path": "sim/step-1"}
        )
        assert [r["worker_url"] for r in refit.json()["results"]] == [active.url]
        assert (await worker_state(http, router.url, drained.url))["is_stale"] is True

        assert (await http.put(path, json={"draining": False})).status_code == 200

        async def caught_up() -> bool:
            state = await worker_state(http, router.url, drained.url)
            return state["weight_version"] == "sim/step-1" and state["state"] == "healthy"

        await wait_until(caught_up, timeout_s=CATCH_UP_DEADLINE_S)
        assert (await sim_state(http, drained))["model_path"] == "sim/step-1"


async def test_checksum_mismatch_keeps_a_worker_stale_through_its_catch_ups(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[T2I] * 3, config=CONFIG) as router:
        workers = router.workers
        corrupt = workers[2]
        await set_faults(http, corrupt, corrupt_weights=True)
        refit = await http.post(
            f"{router.url}/update_weights_from_disk",
            json={"model_path": "sim/step-1", "verify_checksum": True},
        )
        assert refit.status_code == 200
        assert refit.json()["stale_workers"] == [corrupt.url]
        updates = (await sim_state(http, corrupt))["weight_updates"]

        async def replayed_twice() -> bool:
            return (await sim_state(http, corrupt))["weight_updates"] >= updates + 2

        # Each catch-up attempt reloads the weights (the worker accepts that) and then
        # fails the checksum: the worker must never be confirmed meanwhile.
        await wait_until(replayed_twice, timeout_s=CATCH_UP_DEADLINE_S)
        state = await worker_state(http, router.url, corrupt.url)
        assert state["is_stale"] is True and state["weight_version"] is None
        assert (await http.get(f"{router.url}/health")).json()["stale_workers"] == 1

        await set_faults(http, corrupt, corrupt_weights=False)

        async def caught_up() -> bool:
            state = await worker_state(http, router.url, corrupt.url)
            return state["weight_version"] == "sim/step-1" and not state["is_stale"]

        await wait_until(caught_up, timeout_s=CATCH_UP_DEADLINE_S)


async def test_checksums_without_a_majority_mark_nobody_and_report_no_success(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[T2I] * 2, config=CONFIG) as router:
        workers = router.workers
        await set_faults(http, workers[1], corrupt_weights=True)
        refit = await http.post(
            f"{router.url}/update_weights_from_disk",
            json={"model_path": "sim/step-1", "verify_checksum": True, "strict": True},
        )
        # One against one: neither can be called the odd one out.
        assert refit.status_code == 207, refit.text
        answer = refit.json()
        assert answer["success"] is False and answer["stale_workers"] == []
        assert "no majority" in answer["message"]


async def test_models_while_the_pool_sleeps_is_503_asleep_with_retry_after(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[T2I] * 2, config=CONFIG) as router:
        assert (await http.post(f"{router.url}/release_memory_occupation")).status_code == 200
        asleep = await http.get(f"{router.url}/v1/models")
        assert asleep.status_code == 503
        assert asleep.json() == {"error": "pool is asleep"}
        assert int(asleep.headers["retry-after"]) > 0

        assert (await http.post(f"{router.url}/resume_memory_occupation")).status_code == 200
        awake = await http.get(f"{router.url}/v1/models")
        assert awake.status_code == 200 and awake.json()["data"]


async def test_job_lists_while_the_pool_sleeps_are_503_asleep_with_retry_after(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    video = ("--task-type", "T2V", "--sec-per-mpx-step", "0")
    async with trio.open_nursery() as nursery:
        workers = await start_pool(nursery, video, video)
        async with router_process(
            ["--worker-urls", *[w.url for w in workers]], config=CONFIG, tmp_path=tmp_path
        ) as router:
            await healthy(http, router.url, 2)
            assert (await http.post(f"{router.url}/release_memory_occupation")).status_code == 200
            asleep = await http.get(f"{router.url}/v1/videos")
            assert asleep.status_code == 503 and asleep.json() == {"error": "pool is asleep"}
            assert int(asleep.headers["retry-after"]) > 0
            assert (await http.post(f"{router.url}/resume_memory_occupation")).status_code == 200
            assert (await http.get(f"{router.url}/v1/videos")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_method_not_allowed_answers_are_json_with_allow(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with router_process(
        ["--worker-urls", "http://127.0.0.1:9"], config=CONFIG, tmp_path=tmp_path
    ) as router:
        for method, path, allowed in [
            ("GET", "/update_weights_from_disk", "POST"),
            ("POST", "/v1/models", "GET"),
            ("DELETE", "/health", "GET"),
            ("PATCH", "/workers", "POST"),
        ]:
            answer = await http.request(method, f"{router.url}{path}")
            assert answer.status_code == 405, (method, path)
            assert answer.headers["content-type"].startswith("application/json")
            assert method in answer.json()["error"] and path in answer.json()["error"]
            assert allowed in answer.headers["allow"].replace(" ", "").split(",")


# The router answers 413 before httpx has sent the whole body; httpx then leaves its body
# generator unfinished, which Python reports as an unraisable ResourceWarning on the client.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_oversize_bodies_get_json_413_naming_their_limit(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = CONFIG + "[server]\nmax_control_body_mb = 3\n"
    async with routed_pool(http, tmp_path, *[T2I] * 2, config=config) as router:
        workers = router.workers
        # Over the 1 MiB of worker management, within the control limit: delivered.
        tensors = {"serialized_named_tensors": ["t" * (2 * 1024 * 1024)]}
        within = await http.post(f"{router.url}/update_weights_from_tensor", json=tensors)
        assert within.status_code == 200, within.text
        assert [r["status_code"] for r in within.json()["results"]] == [200, 200]

        tensors = {"serialized_named_tensors": ["t" * (4 * 1024 * 1024)]}
        over = await http.post(f"{router.url}/update_weights_from_tensor", json=tensors)
        assert over.status_code == 413
        assert over.headers["content-type"].startswith("application/json")
        assert over.json() == {"error": "Request body exceeds the limit of 3 MiB"}

        async def chunked():  # no content-length: the limit applies as the body arrives
            for _ in range(4):
                yield b"x" * (1024 * 1024)

        streamed = await http.post(f"{router.url}/update_weights_from_tensor", content=chunked())
        assert streamed.status_code == 413
        assert streamed.json() == {"error": "Request body exceeds the limit of 3 MiB"}

        management = await http.post(
            f"{router.url}/workers", json={"url": workers[0].url, "x": "y" * 2 * 1024**2}
        )
        assert management.status_code == 413
        assert management.json() == {"error": "Request body exceeds the limit of 1 MiB"}


async def test_weight_change_reaches_every_worker_byte_for_byte_with_the_request_id(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[T2I] * 2, config=CONFIG) as router:
        workers = router.workers
        # Spacing, key order and a \\u escape that any re-encoding would change.
        raw = b'{ "flush_cache" : false,\n  "model_path": "sim/caf\\u00e9-1" }'
        refit = await http.post(
            f"{router.url}/update_weights_from_disk",
            content=raw,
            headers={"content-type": "application/json", "x-request-id": "refit-42"},
        )
        assert refit.status_code == 200 and refit.json()["success"] is True
        received = [r["body"]["simworker_received"] for r in refit.json()["results"]]
        assert [r["body_sha256"] for r in received] == [hashlib.sha256(raw).hexdigest()] * 2
        assert [r["x-request-id"] for r in received] == ["refit-42", "refit-42"]
        assert (await sim_state(http, workers[0]))["model_path"] == "sim/caf\u00e9-1"

        # Router options must not reach workers: that body is re-encoded without them.
        raw = b'{"model_path": "sim/step-2", "weight_version": "v2"}'
        refit = await http.post(
            f"{router.url}/update_weights_from_disk",
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert refit.status_code == 200 and refit.json()["version"] == "v2"
        received = [r["body"]["simworker_received"] for r in refit.json()["results"]]
        assert all(r["body_sha256"] != hashlib.sha256(raw).hexdigest() for r in received)
        ids = {r["x-request-id"] for r in received}
        assert len(ids) == 1 and "" not in ids, "one request id per broadcast"
