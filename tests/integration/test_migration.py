"""What a client of sglang-d-router or the Miles router sees after switching (issue 17).

Each test pins either the predecessor's behaviour, where dsrouter now matches it, or the
deliberate difference MIGRATING.md lists, through a real router process and real simulated
workers.
"""

import sys
from pathlib import Path
from urllib.parse import quote

import httpx
import trio

from dsrouter.embed import RouterThread, open_router
from tests.integration.test_proxy import healthy, start_pool
from tests.support import free_port, router_process, wait_until, worker_state

CONFIG = """
[health]
interval_s = 0.2
timeout_s = 2.0
"""
NO_PROBES = CONFIG.replace("interval_s = 0.2", "interval_s = 600.0")
"""The router does not notice a worker killed after its first probe."""
T2I = ("--task-type", "T2I")
T2V = ("--task-type", "T2V")
TARGET = "x-dsrouter-target-workers"


async def test_control_answers_have_the_predecessors_shapes(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Release/resume with nothing to do, a worker's plain-text answer, an unreachable
    worker, and (kept) a refit while every worker sleeps."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            workers = await start_pool(nursery, T2I, T2I)
            async with router_process(
                ["--worker-urls", *[w.url for w in workers]], config=NO_PROBES, tmp_path=tmp_path
            ) as router:
                await healthy(http, router.url, 2)
                awake = await http.post(f"{router.url}/resume_memory_occupation")
                assert awake.status_code == 200
                assert awake.json()["message"] == "All workers are already active"
                assert awake.json()["active_workers"] == 2
                assert (await http.post(f"{router.url}/release_memory_occupation")).is_success
                again = await http.post(f"{router.url}/release_memory_occupation")
                assert again.status_code == 200
                assert again.json()["message"] == "All workers are already sleeping"
                assert again.json()["sleeping_workers"] == 2
                # Kept: sglang-d-router answered 200 {"results": []} and loaded nothing.
                refit = await http.post(
                    f"{router.url}/update_weights_from_disk", json={"model_path": "x"}
                )
                assert refit.status_code == 503 and "asleep" in refit.json()["error"]
                assert (await http.post(f"{router.url}/resume_memory_occupation")).is_success

                plain = await http.post(
                    f"{router.url}/update_weights_from_tensor_checker", content=b"not json"
                )
                entries = plain.json()["results"]
                assert [e["status_code"] for e in entries] == [500, 500]
                assert all(set(e["body"]) == {"raw"} for e in entries), entries

                await workers[1].kill()
                checked = await http.post(f"{router.url}/get_weights_checksum", json={})
                gone = next(
                    e for e in checked.json()["results"] if e["worker_url"] == workers[1].url
                )
                assert gone["status_code"] == 502 and isinstance(gone["body"]["error"], str)
            nursery.cancel_scope.cancel()


async def test_video_jobs_and_capabilities_answer_as_sglang_d_router_did(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """`?video_id=` gets the owner's list; a dead owner is 503 "Mapped worker is
    unavailable"; an image request to video-only workers is 400. Kept: an asleep owner
    still answers for its jobs, and video requests while every video worker is out are 503."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            workers = await start_pool(nursery, T2V, T2V)
            async with router_process(
                ["--worker-urls", *[w.url for w in workers]], config=CONFIG, tmp_path=tmp_path
            ) as router:
                await healthy(http, router.url, 2)
                created = await http.post(f"{router.url}/v1/videos", json={"prompt": "a river"})
                assert created.status_code == 200, created.text
                job = created.json()["id"]
                owner = created.headers["x-dsrouter-worker"]
                polled = await http.get(f"{router.url}/v1/videos", params={"video_id": job})
                assert polled.status_code == 200 and polled.headers["x-dsrouter-worker"] == owner
                assert job in [j["id"] for j in polled.json()["data"]]

                image = await http.post(
                    f"{router.url}/v1/images/generations", json={"prompt": "x", "size": "8x8"}
                )
                assert image.status_code == 400 and "image-capable" in image.json()["error"]

                assert (await http.post(f"{router.url}/release_memory_occupation")).is_success
                asleep = await http.get(f"{router.url}/v1/videos/{job}")
                assert asleep.status_code == 200 and asleep.json()["id"] == job
                sleeping_pool = await http.post(f"{router.url}/v1/videos", json={"prompt": "y"})
                assert sleeping_pool.status_code == 503
                assert (await http.post(f"{router.url}/resume_memory_occupation")).is_success

                owner_url = f"http://{owner}"
                for worker in workers:
                    put = await http.put(
                        f"{router.url}/workers/{quote(worker.url, safe='')}",
                        json={"is_dead": True},
                    )
                    assert put.status_code == 200
                dead = await http.get(f"{router.url}/v1/videos/{job}")
                assert dead.status_code == 503
                assert dead.json()["error"] == "Mapped worker is unavailable"
                assert (await worker_state(http, router.url, owner_url))["is_dead"] is True
                all_out = await http.post(f"{router.url}/v1/videos", json={"prompt": "z"})
                assert all_out.status_code == 503
            nursery.cancel_scope.cancel()


async def test_a_named_worker_alone_gets_a_tensor_refit_lora_and_checksum(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A co-located trainer's tensor update goes to its own worker only: the others get no
    call and are not marked stale, and the pool keeps serving on both."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            near, far = await start_pool(nursery, T2I, T2I)
            async with router_process(
                ["--worker-urls", near.url, far.url], config=CONFIG, tmp_path=tmp_path
            ) as router:
                await healthy(http, router.url, 2)
                refit = await http.post(
                    f"{router.url}/update_weights_from_tensor",
                    json={"serialized_named_tensors": ["handle"], "strict": True},
                    headers={TARGET: near.url},
                )
                assert refit.status_code == 200, refit.text
                assert [r["worker_url"] for r in refit.json()["results"]] == [near.url]
                assert refit.json()["success"] is True and refit.json()["stale_workers"] == []
                lora = await http.post(
                    f"{router.url}/v1/set_lora",
                    json={"lora_nickname": "style", "lora_path": "/loras/style"},
                    headers={TARGET: f"{near.url}/"},
                )
                assert [r["worker_url"] for r in lora.json()["results"]] == [near.url]
                checksum = await http.post(
                    f"{router.url}/get_weights_checksum", json={}, headers={TARGET: far.url}
                )
                assert [r["worker_url"] for r in checksum.json()["results"]] == [far.url]
                states = [(await http.get(f"{w.url}/_sim/state")).json() for w in (near, far)]
                assert [s["weight_updates"] for s in states] == [1, 0]
                assert [bool(s["loras"]) for s in states] == [True, False]
                for worker in (near, far):
                    state = await worker_state(http, router.url, worker.url)
                    assert state["state"] == "healthy" and state["is_stale"] is False
                unknown = await http.post(
                    f"{router.url}/update_weights_from_tensor",
                    json={"serialized_named_tensors": ["handle"]},
                    headers={TARGET: "http://127.0.0.1:1"},
                )
                assert unknown.status_code == 400 and "unknown worker" in unknown.json()["error"]
            nursery.cancel_scope.cancel()


async def test_miles_remove_worker_and_a_worker_registered_while_the_pool_sleeps(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """`POST /remove_worker?url=` (Miles), and item 6: a worker registered through
    `POST /workers` while the pool sleeps is put to sleep before it counts."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            first, late = await start_pool(nursery, T2I, T2I)
            async with router_process(
                ["--worker-urls", first.url], config=CONFIG, tmp_path=tmp_path
            ) as router:
                await healthy(http, router.url, 1)
                assert (await http.post(f"{router.url}/release_memory_occupation")).is_success
                added = await http.post(f"{router.url}/workers", json={"url": late.url})
                assert added.status_code == 200

                async def late_asleep() -> bool:
                    slept = (await http.get(f"{late.url}/_sim/state")).json()["sleeping"]
                    state = await worker_state(http, router.url, late.url)
                    return slept and state["is_sleeping"]

                await wait_until(late_asleep)
                health = await http.get(f"{router.url}/health")
                assert health.status_code == 503 and health.json()["healthy_workers"] == 0
                woke = await http.post(f"{router.url}/resume_memory_occupation")
                assert sorted(r["worker_url"] for r in woke.json()["results"]) == sorted(
                    [first.url, late.url]
                )

                removed = await http.post(f"{router.url}/remove_worker", params={"url": late.url})
                assert removed.status_code == 200
                assert removed.json() == {"status": "success", "worker_urls": [first.url]}
                again = await http.post(f"{router.url}/remove_worker", params={"url": late.url})
                assert again.status_code == 404
            nursery.cancel_scope.cancel()


async def _sglang_d_router_output(http: httpx.AsyncClient, flags: list[str]) -> str:
    """Run the console script's function as the script would, with `flags`, until it
    answers /health with 200; stop it and return what it wrote (stdout and stderr)."""
    port = free_port()
    argv = [
        sys.executable,
        "-c",
        "import sys; from dsrouter.cli import sglang_d_router; sys.exit(sglang_d_router())",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *flags,
    ]
    process = await trio.lowlevel.open_process(argv, stdout=-1, stderr=-2)
    try:

        async def serving() -> bool:
            try:
                return (await http.get(f"http://127.0.0.1:{port}/health")).is_success
            except httpx.TransportError:
                return False

        await wait_until(serving, timeout_s=30)
    finally:
        process.terminate()
        await process.wait()
    assert process.stdout is not None
    chunks = []
    while chunk := await process.stdout.receive_some(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks).decode()


async def test_sglang_d_router_command_takes_the_predecessors_flags(
    http: httpx.AsyncClient,
) -> None:
    """The predecessor's flags; `--log-level critical` silences the router's info lines,
    `--log-level trace` (uvicorn's, which it passed on) shows the debug ones."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (worker,) = await start_pool(nursery, T2I)
            flags = [
                "--worker-urls",
                worker.url,
                "--routing-algorithm",
                "least-request",
                "--health-check-interval",
                "1",
                "--timeout",
                "120",
            ]
            quiet = await _sglang_d_router_output(http, [*flags, "--log-level", "critical"])
            assert " INFO " not in quiet and " WARNING " not in quiet, quiet
            # A worker is routable only after a probe, and the probe's result is a DEBUG line.
            loud = await _sglang_d_router_output(http, [*flags, "--log-level", "TRACE"])
            assert " DEBUG " in loud, loud
            nursery.cancel_scope.cancel()


async def test_the_predecessors_settings_bring_back_one_attempt_and_any_model(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """MIGRATING.md's recipe for sglang-d-router's behaviour: with `routing.max_attempts =
    1` a dead worker's 502 reaches the client (no second worker is tried), and with
    `routing.match_model = false` a model name no worker serves is not a 404."""
    old = NO_PROBES + "[routing]\nmax_attempts = 1\nmatch_model = false\n"
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            workers = await start_pool(nursery, T2I, T2I)
            async with router_process(
                [
                    "--worker-urls",
                    *[w.url for w in workers],
                    "--routing-algorithm",
                    "round-robin",
                    "--timeout",
                    "120",
                    "--max-connections",
                    "100",
                ],
                config=old,
                tmp_path=tmp_path,
            ) as router:
                await healthy(http, router.url, 2)
                image = {"prompt": "x", "size": "8x8", "model": "a-name-no-worker-serves"}
                any_model = await http.post(f"{router.url}/v1/images/generations", json=image)
                assert any_model.status_code == 200, any_model.text

                await workers[1].kill()
                answers = [
                    await http.post(f"{router.url}/v1/images/generations", json=image)
                    for _ in range(4)
                ]
                statuses = [a.status_code for a in answers]
                assert 200 in statuses and 502 in statuses, statuses
                failed = next(a for a in answers if a.status_code == 502)
                assert failed.json()["error"].startswith("Worker request failed")
            nursery.cancel_scope.cancel()


async def test_a_worker_is_not_tried_before_its_first_good_probe(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Kept: sglang-d-router routed to a registered worker at once, so a client of a pool
    whose only worker is unreachable got 502 "Worker request failed"; dsrouter routes only
    to probed workers, so the pool has none to offer: 503, which a client may retry."""
    nowhere = f"http://127.0.0.1:{free_port()}"
    with trio.fail_after(60):
        async with router_process(
            ["--worker-urls", nowhere], config=CONFIG, tmp_path=tmp_path
        ) as router:
            answer = await http.post(f"{router.url}/v1/images/generations", json={"prompt": "t"})
            assert answer.status_code == 503
            assert answer.json()["error"] == "No healthy workers available in the pool"


async def test_a_router_runs_inside_a_trio_program_and_inside_a_thread(
    http: httpx.AsyncClient,
) -> None:
    """The embedding API: `open_router` in the caller's trio loop, `RouterThread` for
    asyncio or plain code; both listen when they return and are gone once stopped."""
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            (worker,) = await start_pool(nursery, T2I)
            async with open_router(host="127.0.0.1", port=0, worker_urls=[worker.url]) as router:
                answer = await http.get(f"{router.url}/list_workers")
                assert answer.json() == {"urls": [worker.url]}
            thread = RouterThread(host="127.0.0.1", port=0, worker_urls=[worker.url])
            url = await trio.to_thread.run_sync(thread.start)
            try:
                assert (await http.get(f"{url}/list_workers")).json() == {"urls": [worker.url]}
            finally:
                await trio.to_thread.run_sync(thread.stop)
            for stopped in (router.url, url):
                try:
                    await http.get(f"{stopped}/health")
                except httpx.ConnectError:
                    continue
                raise AssertionError(f"{stopped} still answers")
            nursery.cancel_scope.cancel()
