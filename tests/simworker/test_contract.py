"""The simulated worker against the contract in WORKER_API.md (real processes, real sockets).

The router's tests are only as good as the stand-in they talk to, so the shapes a real
sglang worker gives (error bodies, readiness, sleep, job life cycle) are pinned here.
"""

import base64
import json
import signal
import socket
import struct
import sys

import httpx
import msgpack
import trio

from dsrouter.simworker import media
from tests.integration.test_proxy import image_size
from tests.support import start_simworker, wait_until

INSTANT = ("--sec-per-mpx-step", "0")


async def test_error_bodies_have_the_workers_shapes(http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *INSTANT, "--served-model-name", "m")
        url = worker.url
        assert (await http.get(f"{url}/nope")).json() == {"detail": "Not Found"}
        assert (await http.get(f"{url}/v1/images/generations")).status_code == 405
        missing = await http.get(f"{url}/v1/models/other")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "model_not_found"
        assert (await http.get(f"{url}/v1/models/m")).json()["id"] == "m"
        no_prompt = await http.post(f"{url}/v1/images/generations", json={"size": "8x8"})
        assert no_prompt.status_code == 422
        assert no_prompt.json()["detail"][0]["loc"] == ["body", "prompt"]
        bad_size = await http.post(
            f"{url}/v1/images/generations", json={"prompt": "p", "size": "big"}
        )
        assert bad_size.status_code == 400 and "size" in bad_size.json()["detail"]
        no_image = await http.post(
            f"{url}/v1/images/edits", data={"prompt": "p"}, files={"other": ("a.txt", b"x")}
        )
        assert no_image.status_code == 422 and "image" in no_image.json()["detail"]
        garbled = await http.post(
            f"{url}/v1/images/edits",
            content=b"--x\r\nnonsense",
            headers={"content-type": "multipart/form-data; boundary=x"},
        )
        assert garbled.status_code == 400
        video = await http.post(f"{url}/v1/videos", json={"prompt": "p"})
        assert video.status_code == 400 and "VIDEO" in video.json()["detail"]
        nursery.cancel_scope.cancel()


async def test_images_are_real_files_of_the_requested_size(http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *INSTANT)
        answer = await http.post(
            f"{worker.url}/v1/images/generations",
            json={"prompt": "p", "size": "40x24", "n": 2, "output_format": "png"},
        )
        data = answer.json()["data"]
        assert [d["url"] for d in data] == [
            f"/v1/images/{answer.json()['id']}/content?variant={i}" for i in range(2)
        ]
        for entry in data:
            content = await http.get(worker.url + entry["url"])
            assert content.headers["content-type"] == "image/png"
            assert image_size(content.content) == (40, 24)
        jpeg = media.encode_jpeg(100, 30, seed=4)
        assert image_size(jpeg) == (100, 30) and jpeg.endswith(b"\xff\xd9")
        edit = await http.post(
            f"{worker.url}/v1/images/edits",
            data={"prompt": "p"},
            files={"image": ("in.jpg", jpeg, "image/jpeg")},
        )
        edited = edit.json()["data"][0]["b64_json"]
        assert image_size(base64.b64decode(edited)) == (100, 30)
        nursery.cancel_scope.cancel()


async def test_video_jobs_from_multipart_list_range_and_delete(http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(
            nursery, "--task-type", "T2V", *INSTANT, "--video-bytes", "5000"
        )
        ids = []
        for index in range(3):
            created = await http.post(
                f"{worker.url}/v1/videos",
                files={
                    "prompt": (None, f"v{index}"),
                    "seconds": (None, "1"),
                    "size": (None, "32x32"),
                },
            )
            assert created.status_code == 200 and created.json()["status"] == "queued"
            ids.append(created.json()["id"])

        async def completed() -> bool:
            jobs = (await http.get(f"{worker.url}/v1/videos", params={"limit": 100})).json()
            return all(job["status"] == "completed" for job in jobs["data"])

        await wait_until(completed)
        first = (
            await http.get(f"{worker.url}/v1/videos", params={"limit": 2, "order": "asc"})
        ).json()
        assert [j["id"] for j in first["data"]] == ids[:2] and first["has_more"] is True
        rest = (
            await http.get(
                f"{worker.url}/v1/videos",
                params={"limit": 2, "order": "asc", "after": first["last_id"]},
            )
        ).json()
        assert [j["id"] for j in rest["data"]] == ids[2:] and rest["has_more"] is False
        whole = await http.get(f"{worker.url}/v1/videos/{ids[0]}/content")
        assert whole.headers["content-type"] == "video/mp4" and len(whole.content) == 5000
        assert whole.content[4:8] == b"ftyp"
        part = await http.get(
            f"{worker.url}/v1/videos/{ids[0]}/content", headers={"range": "bytes=100-199"}
        )
        assert part.status_code == 206 and part.content == whole.content[100:200]
        deleted = await http.delete(f"{worker.url}/v1/videos/{ids[0]}")
        assert deleted.json()["status"] == "deleted"
        assert (await http.get(f"{worker.url}/v1/videos/{ids[0]}")).status_code == 404
        nursery.cancel_scope.cancel()


async def test_sleep_refit_and_checksums_follow_the_contract(http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *INSTANT)
        url = worker.url
        before = (await http.post(f"{url}/get_weights_checksum", json={})).json()
        empty = await http.post(f"{url}/update_weights_from_disk")
        assert empty.status_code == 500 and empty.headers["content-type"].startswith("text/plain")
        no_path = await http.post(f"{url}/update_weights_from_disk", json={})
        assert no_path.status_code == 400 and no_path.json()["success"] is False
        broken = await http.post(
            f"{url}/update_weights_from_disk", json={"model_path": "ckpt/missing"}
        )
        assert broken.status_code == 400
        done = await http.post(f"{url}/update_weights_from_disk", json={"model_path": "ckpt/2"})
        assert done.json()["success"] is True
        assert done.headers["x-simworker-model-path"] == "ckpt/2"
        after = (await http.post(f"{url}/get_weights_checksum", json={})).json()
        assert after.keys() == before.keys() and after != before

        assert (await http.post(f"{url}/release_memory_occupation")).json()["sleeping"] is True
        again = await http.post(f"{url}/release_memory_occupation")
        assert "already" in again.json()["message"]
        assert (await http.get(f"{url}/health")).status_code == 200
        image = await http.post(f"{url}/v1/images/generations", json={"prompt": "p"})
        assert image.status_code == 500 and image.text == "Internal Server Error"
        refit = await http.post(f"{url}/update_weights_from_disk", json={"model_path": "x"})
        assert refit.status_code == 500
        rollout = await http.post(f"{url}/rollout/generate", json={"prompt": "p", "seed": 1})
        assert rollout.status_code == 500 and "sleeping" in rollout.json()["detail"]
        assert (await http.post(f"{url}/resume_memory_occupation")).json()["sleeping"] is False
        nursery.cancel_scope.cancel()


async def test_rollout_answers_msgpack_with_safetensors_tensors(http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *INSTANT)
        answer = await http.post(
            f"{worker.url}/rollout/generate",
            json={
                "prompt": "p",
                "seed": 5,
                "width": 64,
                "height": 32,
                "num_inference_steps": 4,
                "num_outputs_per_prompt": 3,
            },
        )
        assert answer.headers["content-type"] == "application/msgpack"
        samples = msgpack.unpackb(answer.content)
        assert [s["seed"] for s in samples] == [5, 6, 7]
        log_probs = samples[0]["rollout_log_probs"]
        blob = log_probs["data"]
        header_len = struct.unpack("<Q", blob[:8])[0]
        header = json.loads(blob[8 : 8 + header_len])
        assert header["t"]["shape"] == log_probs["shape"] == [4]
        assert len(blob) - 8 - header_len == 4 * 4
        assert samples[0]["generated_output"]["shape"] == [1, 4, 4, 8]
        unseeded = await http.post(f"{worker.url}/rollout/generate", json={"prompt": "p"})
        assert unseeded.status_code == 500
        nursery.cancel_scope.cancel()


async def test_faults_readiness_and_ports(http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        warming = await start_simworker(nursery, *INSTANT, "--warmup-s", "60")
        health = await http.get(f"{warming.url}/health")
        assert health.status_code == 503 and health.content == b""
        assert (await http.get(f"{warming.url}/liveness")).status_code == 200

        worker = await start_simworker(nursery, *INSTANT)
        wrong = await http.post(f"{worker.url}/_sim/faults", json={"fail_rate": 3})
        assert wrong.status_code == 400
        await http.post(f"{worker.url}/_sim/faults", json={"fail_rate": 1.0})
        failed = await http.post(f"{worker.url}/v1/images/generations", json={"prompt": "p"})
        assert failed.status_code == 500
        await http.post(
            f"{worker.url}/_sim/faults",
            json={"fail_rate": 0, "backend_failed": "Scheduler worker exited"},
        )
        sick = await http.get(f"{worker.url}/health")
        assert sick.status_code == 503 and sick.json()["status"] == "unhealthy"
        refused = await http.post(f"{worker.url}/v1/images/generations", json={"prompt": "p"})
        assert refused.status_code == 503 and refused.json() == {"error": "Scheduler worker exited"}

        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        strict = await trio.run_process(
            [
                sys.executable,
                "-m",
                "dsrouter.simworker",
                "--port",
                str(port),
                "--strict-ports",
                "true",
            ],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        busy.close()
        assert strict.returncode == 1 and b"in use" in strict.stderr

        # Two ports the kernel handed out at the same time, so they differ and were free.
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            b.bind(("127.0.0.1", 0))
            pair, second = a.getsockname()[1], b.getsockname()[1]
        many = await start_simworker(nursery, *INSTANT, "--port", str(second), port=pair)
        await http.post(f"{many.url}/_sim/faults", json={"slow_body_bps": 10})
        other = (await http.get(f"http://127.0.0.1:{second}/_sim/state")).json()
        assert other["faults"]["slow_body_bps"] == 0 and other["port"] == second

        many.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await many.process.wait() == 0
        nursery.cancel_scope.cancel()
