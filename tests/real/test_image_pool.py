"""The router in front of two real `sglang serve` workers it launched (image model, TI2I).

The tests share the pool and run in file order: the later ones kill parts of it, and the
last one stops the router itself and checks that no sglang process outlives it.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import msgpack
import openai
import pytest
import trio

from dsrouter.simworker import media
from tests.integration.test_proxy import image_size
from tests.launcher.helpers import alive, wait_dead
from tests.real.pool import Pool, launch_pool, managed, registered
from tests.support import Traffic, wait_until
from tests.workers import descendants, make_models, require_sglang, schedulers

FAIL_MARKER = "DSROUTER_FAIL"
IMAGE = {"prompt": "a lighthouse", "size": "64x48", "num_inference_steps": 4}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    require_sglang()
    directory = tmp_path_factory.mktemp("image-pool")
    models = make_models(directory / "models")
    pool = launch_pool(directory, models, "image", num_workers=2, step_s=0.02)
    try:
        yield pool
    finally:
        pool.router.stop()


async def _checksums(http: httpx.AsyncClient, pool: Pool) -> list[dict]:
    answer = (await http.post(f"{pool.url}/get_weights_checksum", json={})).json()
    return [result["body"] for result in answer["results"]]


async def test_images_through_the_openai_sdk_as_b64_by_url_and_edited(
    pool: Pool, http: httpx.AsyncClient
) -> None:
    client = openai.OpenAI(base_url=f"{pool.url}/v1", api_key="unused", max_retries=0)

    def generate() -> tuple[bytes, str, bytes]:
        # The router sends a request only to workers serving the model it names.
        model = client.models.list().data[0].id
        as_b64 = client.images.generate(
            model=model,
            prompt="a lighthouse",
            size="64x48",
            response_format="b64_json",
            extra_body={"num_inference_steps": 4, "seed": 3},
        )
        by_url = client.images.generate(
            model=model, prompt="a harbour", size="32x32", extra_body={"num_inference_steps": 2}
        )
        edited = client.images.edit(
            model=model,
            prompt="at night",
            image=("in.jpg", media.encode_jpeg(100, 30, seed=1), "image/jpeg"),
            extra_body={"size": "48x32", "num_inference_steps": "2"},
        )
        return (
            base64.b64decode(as_b64.data[0].b64_json),
            by_url.data[0].url,
            base64.b64decode(edited.data[0].b64_json),
        )

    first, url, edited = await trio.to_thread.run_sync(generate)
    assert first[:2] == b"\xff\xd8" and image_size(first) == (64, 48)  # sglang's default JPEG
    assert image_size(edited) == (48, 32)
    assert url.startswith("/v1/images/") and url.endswith("/content")
    workers = {w["url"] for w in (await registered(http, pool)).values()}
    served_by = set()
    for _ in range(4):  # the content route is sticky: always the worker that made it
        content = await http.get(pool.url + url)
        assert content.status_code == 200 and content.headers["content-type"] == "image/jpeg"
        assert image_size(content.content) == (32, 32)
        served_by.add(content.headers["x-dsrouter-worker"])
    assert len(served_by) == 1 and f"http://{served_by.pop()}" in workers


async def test_rollout_through_the_router_answers_msgpack_and_failures_pass_through(
    pool: Pool, http: httpx.AsyncClient
) -> None:
    answer = await http.post(
        f"{pool.url}/rollout/generate",
        json={
            "prompt": "p",
            "seed": 9,
            "width": 32,
            "height": 16,
            "num_inference_steps": 3,
            "num_outputs_per_prompt": 2,
            "rollout_return_dit_trajectory": True,
        },
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"] == "application/msgpack"
    samples = msgpack.unpackb(answer.content)
    assert [s["seed"] for s in samples] == [9, 9]
    assert samples[0]["generated_output"]["shape"] == [3, 16, 32]
    assert samples[0]["rollout_log_probs"]["shape"] == [3]
    assert samples[0]["dit_trajectory"]["latents"]["shape"] == [4, 4]
    failed = await http.post(
        f"{pool.url}/rollout/generate", json={"prompt": FAIL_MARKER, "seed": 1}
    )
    assert failed.status_code == 500 and FAIL_MARKER in failed.json()["detail"]


async def test_refit_from_disk_leaves_every_checksum_equal(
    pool: Pool, http: httpx.AsyncClient
) -> None:
    before = await _checksums(http, pool)
    assert len(before) == 2 and before[0] == before[1]
    refit = await http.post(
        f"{pool.url}/update_weights_from_disk",
        json={"model_path": str(pool.models["image-v2"]), "weight_version": "v2"},
    )
    assert refit.status_code == 200, refit.text
    assert refit.json()["success"] is True and refit.json()["version"] == "v2"
    after = (await http.post(f"{pool.url}/get_weights_checksum", json={})).json()
    assert after["consistent"] is True
    assert [r["body"] for r in after["results"]] != before
    for worker in (await registered(http, pool)).values():
        assert worker["weight_version"] == "v2" and worker["state"] == "healthy"
    image = await http.post(f"{pool.url}/v1/images/generations", json=IMAGE)
    assert image.status_code == 200


async def test_sleep_makes_the_pool_answer_503_asleep_until_woken(
    pool: Pool, http: httpx.AsyncClient
) -> None:
    released = (await http.post(f"{pool.url}/release_memory_occupation")).json()
    assert [r["body"]["sleeping"] for r in released["results"]] == [True, True]
    asleep = await http.post(f"{pool.url}/v1/images/generations", json=IMAGE)
    assert asleep.status_code == 503 and asleep.json() == {"error": "pool is asleep"}
    assert "retry-after" in asleep.headers
    states = {w["state"] for w in (await registered(http, pool)).values()}
    assert states == {"sleeping"}
    woken = (await http.post(f"{pool.url}/resume_memory_occupation")).json()
    assert [r["body"]["sleeping"] for r in woken["results"]] == [False, False]
    awake = await http.post(f"{pool.url}/v1/images/generations", json=IMAGE)
    assert awake.status_code == 200


async def test_a_killed_scheduler_gets_its_worker_restarted_and_caught_up(
    pool: Pool, http: httpx.AsyncClient, tmp_path: Path
) -> None:
    """Also: a refit from missing weights changes nothing, and a worker that cannot load
    the pool's weights stays stale (not routable) until it can."""
    from dsrouter_sglang_testplugin.models import write_model

    v3 = tmp_path / "FLUX.2-dev-v3"
    write_model(v3, "image", seed=3)
    refit = await http.post(
        f"{pool.url}/update_weights_from_disk", json={"model_path": str(v3), "weight_version": "v3"}
    )
    assert refit.json()["success"] is True
    empty = tmp_path / "no-weights"
    empty.mkdir()
    nothing = await http.post(
        f"{pool.url}/update_weights_from_disk", json={"model_path": str(empty)}
    )
    assert nothing.json()["success"] is False and nothing.json()["version"] == "v3"
    assert all("missing weight files" in r["body"]["message"] for r in nothing.json()["results"])
    assert nothing.json()["stale_workers"] == []

    # The pool's weights disappear from disk; then worker 0 loses its scheduler.
    weights = v3 / "transformer"
    hidden = tmp_path / "hidden-weights"
    shutil.move(weights, hidden)
    weights.mkdir()
    slot = (await managed(http, pool))[0]
    url, pid = slot["url"], slot["pid"]
    killed = schedulers(pid)
    assert killed, "no scheduler process found"
    for scheduler in killed:
        os.kill(scheduler, signal.SIGKILL)

    seen_health: list[str] = []
    seen_slot: list[str] = []

    async def restarted_and_registered() -> bool:
        state = await _health_state(http, url)
        if not seen_health or seen_health[-1] != state:
            seen_health.append(state)
        slot = (await managed(http, pool))[0]
        if not seen_slot or seen_slot[-1] != slot["state"]:
            seen_slot.append(slot["state"])
        return slot["pid"] not in (None, pid) and slot["registered"]

    await wait_until(restarted_and_registered, timeout_s=180, interval_s=0.1)
    # 200 until /health sees the scheduler gone, then its failure (JSON, for good), then
    # the restart: port closed while loading, empty 503 while warming up, ready.
    assert "refused" in seen_health, seen_health
    before_restart = seen_health[: seen_health.index("refused")]
    assert any(s.startswith("503 {") and '"unhealthy"' in s for s in before_restart), seen_health
    after_refused = seen_health[seen_health.index("refused") :]
    assert after_refused[-2:] == ["503 empty", "200"], seen_health
    assert "starting" in seen_slot and seen_slot[-1] == "ready", seen_slot
    assert not alive(pid)

    async def stale_for_missing_weights() -> bool:
        worker = (await registered(http, pool)).get(url)
        return bool(
            worker
            and worker["state"] == "stale"
            and "missing weight files" in (worker["last_error"] or "")
        )

    await wait_until(stale_for_missing_weights, timeout_s=30)
    worker = (await registered(http, pool))[url]
    assert worker["is_stale"] is True and worker["weight_version"] != "v3"
    for _ in range(3):  # traffic goes to the healthy worker only
        answer = await http.post(f"{pool.url}/v1/images/generations", json=IMAGE)
        assert answer.status_code == 200 and f"http://{answer.headers['x-dsrouter-worker']}" != url

    weights.rmdir()
    shutil.move(hidden, weights)

    async def caught_up() -> bool:
        worker = (await registered(http, pool)).get(url)
        return bool(worker and worker["state"] == "healthy" and worker["weight_version"] == "v3")

    await wait_until(caught_up, timeout_s=90)
    checksums = (await http.post(f"{pool.url}/get_weights_checksum", json={})).json()
    assert checksums["consistent"] is True and len(checksums["results"]) == 2


async def test_sigkill_of_a_worker_under_traffic_fails_no_request(
    pool: Pool, http: httpx.AsyncClient
) -> None:
    traffic = Traffic("/v1/images/generations", {**IMAGE, "num_inference_steps": 10})
    victim = (await managed(http, pool))[1]
    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(traffic.client, http, pool.url)

        async def answered(count: int) -> bool:
            return len(traffic.answers) >= count

        await wait_until(lambda: answered(6), timeout_s=60)
        killed_at = trio.current_time()
        os.kill(victim["pid"], signal.SIGKILL)
        target = len(traffic.answers) + 12
        await wait_until(lambda: answered(target), timeout_s=60)
        traffic.stop()
    assert traffic.after(killed_at), "no request finished after the kill"
    assert set(traffic.statuses) == {200}, traffic.statuses

    async def back() -> bool:
        slot = (await managed(http, pool))[1]
        worker = (await registered(http, pool)).get(slot["url"])
        return slot["pid"] != victim["pid"] and bool(worker and worker["state"] == "healthy")

    await wait_until(back, timeout_s=180)


async def test_router_sigterm_leaves_no_sglang_process(pool: Pool, http: httpx.AsyncClient) -> None:
    slots = await managed(http, pool)
    pids = [slot["pid"] for slot in slots]
    assert all(pids)
    family = [*pids, *(child for pid in pids for child in descendants(pid))]
    assert len(family) >= 4  # each worker has at least its scheduler
    pool.router.popen.send_signal(signal.SIGTERM)
    with trio.fail_after(90):
        while pool.router.popen.poll() is None:  # noqa: ASYNC110 - another process
            await trio.sleep(0.1)
    assert pool.router.popen.returncode == 0, pool.router.tail()
    await wait_dead(family, timeout_s=10)


async def _health_state(http: httpx.AsyncClient, url: str) -> str:
    try:
        answer = await http.get(f"{url}/health", timeout=2)
    except httpx.TransportError:
        return "refused"
    if answer.status_code == 503:
        return "503 " + (answer.text or "empty")
    return str(answer.status_code)
