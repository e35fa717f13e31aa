"""Video jobs through the router, served by a real `sglang serve` video worker (Wan, T2V).

The job is created with the `openai` SDK (multipart, as it always sends), polled through the
router while the worker reports per-step progress, downloaded, listed and deleted.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import httpx
import openai
import pytest
import trio

from tests.real.pool import Pool, launch_pool
from tests.support import wait_until
from tests.workers import make_models, require_sglang

FAIL_MARKER = "DSROUTER_FAIL"


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    require_sglang()
    directory = tmp_path_factory.mktemp("video-pool")
    models = make_models(directory / "models")
    pool = launch_pool(directory, models, "video", num_workers=1, step_s=0.05)
    try:
        yield pool
    finally:
        pool.router.stop()


async def test_a_video_job_through_the_router_from_create_to_delete(
    pool: Pool, http: httpx.AsyncClient
) -> None:
    client = openai.OpenAI(base_url=f"{pool.url}/v1", api_key="unused", max_retries=0)

    def create() -> str:
        model = client.models.list().data[0].id  # the router checks the model a request names
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            video = client.videos.create(
                model=model,
                prompt="a flowing river",
                seconds="1",  # type: ignore[arg-type]
                size="64x48",  # type: ignore[arg-type]
                extra_body={"fps": 8, "num_inference_steps": 40},
            )
        assert video.status == "queued" and video.size == "64x48"
        return video.id

    video_id = await trio.to_thread.run_sync(create)
    progress: list[tuple[str, int]] = []

    async def completed() -> bool:
        job = (await http.get(f"{pool.url}/v1/videos/{video_id}")).json()
        if not progress or progress[-1] != (job["status"], job["progress"]):
            progress.append((job["status"], job["progress"]))
        return job["status"] in ("completed", "failed")

    await wait_until(completed, timeout_s=60, interval_s=0.05)
    assert progress[-1] == ("completed", 100), progress
    running = [p for status, p in progress if status == "in_progress"]
    assert running and any(0 < p < 100 for p in running), progress
    assert running == sorted(running), "progress never goes back"

    content = await http.get(f"{pool.url}/v1/videos/{video_id}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert content.content[4:8] == b"ftyp"
    assert len(content.content) == int(content.headers["content-length"])
    listed = (await http.get(f"{pool.url}/v1/videos", params={"limit": 100})).json()
    assert video_id in [job["id"] for job in listed["data"]]
    deleted = await http.delete(f"{pool.url}/v1/videos/{video_id}")
    assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
    assert (await http.get(f"{pool.url}/v1/videos/{video_id}")).status_code == 404


async def test_content_before_completion_and_a_failed_job_answer_as_the_worker_does(
    pool: Pool, http: httpx.AsyncClient
) -> None:
    slow = await http.post(
        f"{pool.url}/v1/videos",
        json={"prompt": "slow", "seconds": 1, "fps": 4, "size": "32x32", "num_inference_steps": 60},
    )
    early = await http.get(f"{pool.url}/v1/videos/{slow.json()['id']}/content")
    assert early.status_code == 404
    assert early.json() == {"detail": "Generation is still in-progress"}
    failing = await http.post(
        f"{pool.url}/v1/videos",
        json={"prompt": f"{FAIL_MARKER} now", "seconds": 1, "fps": 4, "size": "32x32"},
    )
    failing_id = failing.json()["id"]

    async def settled() -> bool:
        job = (await http.get(f"{pool.url}/v1/videos/{failing_id}")).json()
        return job["status"] == "failed"

    await wait_until(settled, timeout_s=60)
    job = (await http.get(f"{pool.url}/v1/videos/{failing_id}")).json()
    assert job["error"]["message"].startswith("Model generation failed.")
    assert FAIL_MARKER in job["error"]["message"]
    assert (await http.get(f"{pool.url}/v1/videos/{failing_id}/content")).status_code == 404
