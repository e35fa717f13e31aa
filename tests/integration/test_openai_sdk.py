"""The real `openai` package as a client of the router."""

import base64
import warnings
from pathlib import Path

import httpx
import openai
import trio

from tests.integration.test_proxy import image_size
from tests.support import routed_pool


async def test_openai_images_and_videos_through_the_router(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(
        http,
        tmp_path,
        ("--task-type", "T2I,T2V", "--sec-per-mpx-step", "0", "--video-bytes", "123456"),
    ) as router:
        client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)

        def images() -> tuple[bytes, bytes]:
            generated = client.images.generate(
                model="sim/Wan-Sim",
                prompt="a lighthouse",
                size="256x256",
                response_format="b64_json",
                extra_body={"seed": 7},
            )
            first = base64.b64decode(generated.data[0].b64_json)
            edited = client.images.edit(
                model="sim/Wan-Sim",
                prompt="at night",
                image=("in.jpg", first, "image/jpeg"),
                extra_body={"size": "128x128"},
            )
            return first, base64.b64decode(edited.data[0].b64_json)

        first, edited = await trio.to_thread.run_sync(images)
        assert image_size(first) == (256, 256)
        assert image_size(edited) == (128, 128)

        def videos() -> tuple[str, bytes]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                video = client.videos.create(
                    model="sim/Wan-Sim", prompt="waves", seconds="4", size="720x1280"
                )
                final = client.videos.poll(video.id, poll_interval_ms=50)
                content = client.videos.download_content(video.id)
                return final.status, content.read()

        status, content = await trio.to_thread.run_sync(videos)
        assert status == "completed"
        assert len(content) == 123456
