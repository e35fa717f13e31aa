"""Big bodies in both directions, and clients that vanish mid-transfer."""

import hashlib
import os
from pathlib import Path

import httpx
import trio

from tests.support import routed_pool, wait_until

GiB = 1024**3
MiB = 1024**2


async def test_one_gib_video_download_matches_the_worker_byte_for_byte(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(
        http, tmp_path, ("--task-type", "T2V", "--sec-per-mpx-step", "0", "--video-bytes", str(GiB))
    ) as router:
        [worker] = router.workers
        job = (
            await http.post(
                f"{router.url}/v1/videos",
                json={"prompt": "long", "seconds": 1, "size": "32x32"},
            )
        ).json()

        async def done() -> bool:
            status = await http.get(f"{router.url}/v1/videos/{job['id']}")
            return status.json()["status"] == "completed"

        await wait_until(done)

        async def digest(url: str) -> tuple[str, int]:
            sha, size = hashlib.sha256(), 0
            async with http.stream("GET", url) as response:
                assert response.status_code == 200
                assert int(response.headers["content-length"]) == GiB
                async for chunk in response.aiter_raw():
                    sha.update(chunk)
                    size += len(chunk)
            return sha.hexdigest(), size

        via_router = await digest(f"{router.url}/v1/videos/{job['id']}/content")
        direct = await digest(f"{worker.url}/v1/videos/{job['id']}/content")
        assert via_router == direct and via_router[1] == GiB


async def test_200_mib_multipart_upload_arrives_byte_exact(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    boundary = "dsrouter-test-boundary"
    chunk = os.urandom(MiB)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nedit\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
        f'filename="big.png"\r\nContent-Type: image/png\r\n\r\n'
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    total = len(head) + 200 * MiB + len(tail)
    expected = hashlib.sha256(head)
    for _ in range(200):
        expected.update(chunk)
    expected.update(tail)

    async def body():
        yield head
        for _ in range(200):
            yield chunk
        yield tail

    async with routed_pool(
        http, tmp_path, ("--task-type", "T2I", "--sec-per-mpx-step", "0")
    ) as router:
        response = await http.post(
            f"{router.url}/v1/images/edits",
            content=body(),
            headers={
                "content-type": f"multipart/form-data; boundary={boundary}",
                "content-length": str(total),
            },
        )
        assert response.status_code == 200, response.text[:300]
        assert response.headers["x-simworker-body-sha256"] == expected.hexdigest()


async def test_client_gone_mid_download_frees_the_lease_at_once(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(
        http,
        tmp_path,
        (
            "--task-type",
            "T2V",
            "--sec-per-mpx-step",
            "0",
            "--video-bytes",
            str(512 * MiB),
            "--slow-body-bps",
            str(4 * MiB),
        ),
    ) as router:
        [worker] = router.workers
        job = (
            await http.post(
                f"{router.url}/v1/videos", json={"prompt": "p", "seconds": 1, "size": "32x32"}
            )
        ).json()

        async def done() -> bool:
            status = await http.get(f"{router.url}/v1/videos/{job['id']}")
            return status.json()["status"] == "completed"

        await wait_until(done)

        async def router_in_flight() -> int:
            workers = (await http.get(f"{router.url}/workers")).json()["workers"]
            return workers[0]["active_requests"]

        host, port = router.url.removeprefix("http://").split(":")
        client = await trio.open_tcp_stream(host, int(port))
        await client.send_all(
            f"GET /v1/videos/{job['id']}/content HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += await client.receive_some(65536)
        assert head.startswith(b"HTTP/1.1 200")
        assert await router_in_flight() == 1
        await client.aclose()

        async def released() -> bool:
            state = (await http.get(f"{worker.url}/_sim/state")).json()
            return await router_in_flight() == 0 and state["in_flight"] == 0

        await wait_until(released, timeout_s=10)
