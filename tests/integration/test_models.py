"""A pool serving two image models and a video model: a request's `model` picks the workers
(issue 14). Real router process, real simulated workers."""

from pathlib import Path

import httpx
import trio

from tests.integration.test_proxy import CONFIG, start_pool
from tests.support import healthy, router_process

NOT_FOUND = {
    "error": {
        "message": "The model 'nope' does not exist",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
}


async def test_mixed_pool_routes_each_model_to_its_workers(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        a, b, video = await start_pool(
            nursery,
            ("--task-type", "T2I", "--model-path", "org/image-a", "--served-model-name", "a"),
            ("--task-type", "T2I", "--model-path", "org/image-b"),
            ("--task-type", "T2V", "--model-path", "org/video", "--served-model-name", "v"),
        )
        async with router_process(
            ["--worker-urls", a.url, b.url, video.url], config=CONFIG, tmp_path=tmp_path
        ) as router:
            await healthy(http, router.url, 3)
            listed = (await http.get(f"{router.url}/workers")).json()["workers"]
            display = {w["url"]: w["display_id"] for w in listed}

            async def image(model: str | None) -> httpx.Response:
                body = {"prompt": "p", "size": "32x32", **({"model": model} if model else {})}
                return await http.post(f"{router.url}/v1/images/generations", json=body)

            for model, worker in (("a", a), ("org/image-a", a), ("org/image-b", b)):
                for _ in range(4):
                    answer = await image(model)
                    assert answer.status_code == 200
                    assert answer.headers["x-dsrouter-worker"] == display[worker.url], model
            unnamed = {(await image(None)).headers["x-dsrouter-worker"] for _ in range(6)}
            assert unnamed <= {display[a.url], display[b.url]}

            unknown = await image("nope")
            assert unknown.status_code == 404
            assert unknown.json() == NOT_FOUND

            # The OpenAI SDK sends videos.create as multipart; the model is a text field.
            form = {"prompt": "waves", "model": "v", "seconds": "1", "size": "64x64"}
            created = await http.post(
                f"{router.url}/v1/videos", files={k: (None, v) for k, v in form.items()}
            )
            assert created.status_code == 200
            assert created.headers["x-dsrouter-worker"] == display[video.url]
            wrong_output = await http.post(
                f"{router.url}/v1/videos", json={"prompt": "waves", "model": "a"}
            )
            assert wrong_output.status_code == 400
            assert "VIDEO" in wrong_output.json()["error"]

            models = (await http.get(f"{router.url}/v1/models")).json()["data"]
            assert sorted(card["id"] for card in models) == ["a", "org/image-b", "v"]
            card = await http.get(f"{router.url}/v1/models/a")
            assert card.status_code == 200 and card.json()["id"] == "a"
            by_path = await http.get(f"{router.url}/v1/models/org/image-a")
            assert by_path.status_code == 200 and by_path.json()["id"] == "a"
            missing = await http.get(f"{router.url}/v1/models/nope")
            assert missing.status_code == 404 and missing.json() == NOT_FOUND
        nursery.cancel_scope.cancel()
