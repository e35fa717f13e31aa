"""Every inference and RL route through a real router process to real simulated workers."""

import base64
import hashlib
import struct
from pathlib import Path

import httpx
import msgpack
import trio

from tests.support import healthy, router_process, start_simworker, wait_until

CONFIG = """
[health]
interval_s = 0.3
timeout_s = 2.0
"""


def image_size(data: bytes) -> tuple[int, int]:
    """Width and height of a PNG or baseline JPEG, read from its header."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return struct.unpack(">II", data[16:24])
    assert data[:2] == b"\xff\xd8", "neither PNG nor JPEG"
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        i += 2 + length
    raise AssertionError("no SOF marker")


async def start_pool(nursery: trio.Nursery, *specs: tuple[str, ...]) -> list:
    return [await start_simworker(nursery, "--sec-per-mpx-step", "0", *spec) for spec in specs]


async def test_images_generate_edit_and_sticky_content(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        workers = await start_pool(nursery, ("--task-type", "T2I"), ("--task-type", "T2I"))
        async with router_process(
            ["--worker-urls", *[w.url for w in workers]], config=CONFIG, tmp_path=tmp_path
        ) as router:
            await healthy(http, router.url, 2)
            answer = await http.post(
                f"{router.url}/v1/images/generations",
                json={"prompt": "a fox", "size": "96x64", "response_format": "b64_json", "seed": 1},
            )
            assert answer.status_code == 200
            assert answer.headers["x-request-id"]
            image = base64.b64decode(answer.json()["data"][0]["b64_json"])
            assert image_size(image) == (96, 64)

            for _ in range(4):
                by_url = await http.post(
                    f"{router.url}/v1/images/generations",
                    json={"prompt": "a fox", "size": "64x48", "response_format": "url"},
                )
                url = by_url.json()["data"][0]["url"]
                assert url.startswith("/v1/images/")
                content = await http.get(router.url + url)
                assert content.status_code == 200
                assert image_size(content.content) == (64, 48)
                assert content.headers["x-dsrouter-worker"] == by_url.headers["x-dsrouter-worker"]

            files = {"image": ("in.png", image, "image/png")}
            request = http.build_request(
                "POST",
                f"{router.url}/v1/images/edits",
                files=files,
                data={"prompt": "make it blue", "size": "32x32"},
            )
            sent = request.read()
            edit = await http.send(request)
            assert edit.status_code == 200
            assert image_size(base64.b64decode(edit.json()["data"][0]["b64_json"])) == (32, 32)
            assert edit.headers["x-simworker-body-sha256"] == hashlib.sha256(sent).hexdigest()

            unknown = await http.get(f"{router.url}/v1/images/nope/content")
            assert unknown.status_code == 404 and "error" in unknown.json()
        nursery.cancel_scope.cancel()


async def test_videos_are_sticky_listed_and_survive_a_router_restart(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        workers = await start_pool(
            nursery,
            ("--task-type", "T2V", "--video-bytes", "300000"),
            ("--task-type", "T2V", "--video-bytes", "300000"),
            (
                "--task-type",
                "T2I",
            ),
        )
        args = ["--worker-urls", *[w.url for w in workers]]
        created = []
        async with router_process(args, config=CONFIG, tmp_path=tmp_path) as router:
            await healthy(http, router.url, 3)
            for i in range(4):
                job = await http.post(
                    f"{router.url}/v1/videos",
                    json={"prompt": f"river {i}", "seconds": 1, "size": "64x64"},
                )
                assert job.status_code == 200, job.text
                assert job.json()["status"] == "queued"
                assert job.headers["x-dsrouter-worker"] != f"127.0.0.1:{workers[2].port}"
                created.append((job.json()["id"], job.headers["x-dsrouter-worker"]))
            alias = await http.post(
                f"{router.url}/generate_video",
                json={"prompt": "alias", "seconds": 1, "size": "64x64"},
            )
            assert alias.status_code == 200
            created.append((alias.json()["id"], alias.headers["x-dsrouter-worker"]))

            async def all_done() -> bool:
                for job_id, _ in created:
                    status = (await http.get(f"{router.url}/v1/videos/{job_id}")).json()
                    if status["status"] != "completed":
                        return False
                return True

            await wait_until(all_done)
            for job_id, owner in created:
                by_query = await http.get(f"{router.url}/v1/videos", params={"video_id": job_id})
                # sglang-d-router's answer: the owner's own job list (MIGRATING.md)
                assert job_id in [j["id"] for j in by_query.json()["data"]]
                assert by_query.headers["x-dsrouter-worker"] == owner
            listing = (await http.get(f"{router.url}/v1/videos", params={"limit": 3})).json()
            assert len(listing["data"]) == 3 and listing["has_more"] is True
            rest = (
                await http.get(
                    f"{router.url}/v1/videos", params={"limit": 100, "after": listing["last_id"]}
                )
            ).json()
            ids = [job["id"] for job in listing["data"] + rest["data"]]
            assert sorted(ids) == sorted(job_id for job_id, _ in created)
            assert (await http.get(f"{router.url}/v1/videos/unknown")).status_code == 404

        async with router_process(args, config=CONFIG, tmp_path=tmp_path) as router:
            await healthy(http, router.url, 3)
            job_id, owner = created[0]
            status = await http.get(f"{router.url}/v1/videos/{job_id}")
            assert status.status_code == 200 and status.headers["x-dsrouter-worker"] == owner
            content = await http.get(f"{router.url}/v1/videos/{job_id}/content")
            assert content.status_code == 200
            assert content.headers["content-type"] == "video/mp4"
            assert len(content.content) == 300000
            deleted = await http.delete(f"{router.url}/v1/videos/{job_id}")
            assert deleted.status_code == 200 and deleted.json()["status"] == "deleted"
            assert (await http.get(f"{router.url}/v1/videos/{job_id}")).status_code == 404
        nursery.cancel_scope.cancel()


async def test_video_and_mesh_routes_without_capable_workers_are_400(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        workers = await start_pool(nursery, ("--task-type", "T2I"))
        async with router_process(
            ["--worker-urls", workers[0].url], config=CONFIG, tmp_path=tmp_path
        ) as router:
            await healthy(http, router.url, 1)
            response = await http.post(f"{router.url}/v1/videos", json={"prompt": "x"})
            assert response.status_code == 400 and "video" in response.json()["error"]
            listed = await http.get(f"{router.url}/v1/videos")
            assert listed.status_code == 400 and "video-capable" in listed.json()["error"]
            mesh = await http.post(f"{router.url}/v1/meshes", json={"prompt": "x"})
            assert mesh.status_code == 400 and "mesh-capable" in mesh.json()["error"]
            image = await http.post(
                f"{router.url}/v1/images/generations", json={"prompt": "x", "size": "8x8"}
            )
            assert image.status_code == 200
        nursery.cancel_scope.cancel()


async def test_rollout_models_and_worker_errors_pass_through(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        workers = await start_pool(
            nursery,
            ("--task-type", "T2I", "--served-model-name", "m-a"),
            ("--task-type", "T2I", "--served-model-name", "m-b"),
            ("--task-type", "T2I", "--served-model-name", "m-a"),
        )
        async with router_process(
            ["--worker-urls", *[w.url for w in workers]], config=CONFIG, tmp_path=tmp_path
        ) as router:
            await healthy(http, router.url, 3)
            rollout = await http.post(
                f"{router.url}/rollout/generate",
                json={
                    "prompt": "p",
                    "seed": 3,
                    "width": 32,
                    "height": 32,
                    "num_outputs_per_prompt": 2,
                },
            )
            assert rollout.status_code == 200
            assert rollout.headers["content-type"].startswith("application/msgpack")
            samples = msgpack.unpackb(rollout.content)
            assert len(samples) == 2 and samples[0]["seed"] == 3

            models = (await http.get(f"{router.url}/v1/models")).json()
            assert models["object"] == "list"
            assert sorted(m["id"] for m in models["data"]) == ["m-a", "m-b"]
            card = await http.get(f"{router.url}/v1/models/m-b")
            assert card.status_code in (200, 404)

            invalid = await http.post(f"{router.url}/v1/images/generations", json={})
            assert invalid.status_code == 422 and "detail" in invalid.json()
            bad_size = await http.post(
                f"{router.url}/v1/images/generations", json={"prompt": "p", "size": "huge"}
            )
            assert bad_size.status_code == 400 and "detail" in bad_size.json()
            unknown = await http.get(f"{router.url}/no/such/path")
            assert unknown.status_code == 404 and unknown.json() == {"detail": "Not Found"}
        nursery.cancel_scope.cancel()


async def test_rl_broadcasts_and_sleep_bookkeeping(tmp_path: Path, http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        workers = await start_pool(nursery, ("--task-type", "T2I"), ("--task-type", "T2I"))
        async with router_process(
            ["--worker-urls", *[w.url for w in workers]], config=CONFIG, tmp_path=tmp_path
        ) as router:
            await healthy(http, router.url, 2)
            refit = await http.post(
                f"{router.url}/update_weights_from_disk", json={"model_path": "sim/step-1"}
            )
            assert refit.status_code == 200
            results = refit.json()["results"]
            assert sorted(r["worker_url"] for r in results) == sorted(w.url for w in workers)
            assert all(r["status_code"] == 200 and r["body"]["success"] for r in results)
            pool = (await http.get(f"{router.url}/health")).json()
            assert pool["target_version"] == "sim/step-1" and pool["stale_workers"] == 0
            listed = (await http.get(f"{router.url}/workers")).json()
            assert listed["target_version"] == "sim/step-1"
            assert {w["weight_version"] for w in listed["workers"]} == {"sim/step-1"}

            served = await http.post(
                f"{router.url}/v1/images/generations", json={"prompt": "p", "size": "16x16"}
            )
            assert served.headers["x-simworker-model-path"] == "sim/step-1"

            checksum = (await http.post(f"{router.url}/get_weights_checksum")).json()
            assert checksum["consistent"] is True and len(checksum["results"]) == 2

            empty_body = await http.post(f"{router.url}/update_weights_from_disk")
            assert all(r["status_code"] == 400 for r in empty_body.json()["results"])

            slept = await http.post(f"{router.url}/release_memory_occupation")
            assert slept.status_code == 200 and len(slept.json()["results"]) == 2
            health = await http.get(f"{router.url}/health")
            assert health.status_code == 503 and health.json()["sleeping_workers"] == 2
            again = await http.post(f"{router.url}/release_memory_occupation")
            assert again.status_code == 200 and "already" in again.json()["message"]
            refused = await http.post(
                f"{router.url}/update_weights_from_disk", json={"model_path": "x"}
            )
            assert refused.status_code == 503

            woke = await http.post(f"{router.url}/resume_memory_occupation")
            assert woke.status_code == 200 and len(woke.json()["results"]) == 2
            assert (await http.get(f"{router.url}/health")).json()["healthy_workers"] == 2
            none = await http.post(f"{router.url}/resume_memory_occupation")
            assert none.status_code == 200 and none.json()["results"] == []
        nursery.cancel_scope.cancel()
