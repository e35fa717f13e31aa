"""One contract, two implementations: the simulated worker and the real `sglang serve`.

The router's tests are only as good as the stand-in they talk to, so every test here that
takes `contract` runs twice, against `[sim]` (`python -m dsrouter.simworker`) and against
`[real]` (sglang 0.5.23 with the test plugin's tiny CPU pipeline, `tests/workers.py`), with
the same assertions. A change that makes the simulator drift from the real server (an
error shape, a status, an ordering) fails here on `[sim]`. `[real]` skips without sglang
(CI installs it and sets `DSROUTER_REQUIRE_SGLANG=1`).

Each implementation is one image worker (task TI2I: generations and edits) and one video
worker (T2V), shared by the tests of this module and started once. The last test breaks
the image worker's backend, so it must stay last.
"""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import socket
import struct
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import msgpack
import pytest
import trio

from dsrouter.simworker import media
from tests.integration.test_proxy import image_size
from tests.support import raw_request, start_simworker, wait_until
from tests.workers import (
    Process,
    make_models,
    plugin_env,
    require_sglang,
    schedulers,
    start_real_workers,
    start_simworkers,
)

FAIL_MARKER = "DSROUTER_FAIL"
"""In a prompt, makes the generation fail on both implementations."""
SIM_FAST = ["--sec-per-mpx-step", "0", "--load-s", "0.5", "--warmup-s", "1"]


@attrs.define
class Contract:
    """The workers of one implementation and what the tests need to drive them."""

    kind: str
    image: Process
    video: Process
    weights_v1: str
    weights_v2: str
    no_weights: str
    """An existing directory without weight files: a refit from it fails (400)."""

    def break_backend(self) -> None:
        """What a dead GPU process does to a worker, by the means of each implementation."""
        if self.kind == "sim":
            answer = httpx.post(
                f"{self.image.url}/_sim/faults",
                json={"backend_failed": "Scheduler worker exited; restart the server."},
                trust_env=False,
            )
            answer.raise_for_status()
            return
        killed = schedulers(self.image.pid)
        assert killed, "the real worker has no scheduler process"
        for pid in killed:
            _kill(pid)


async def assert_plain_500_then_close(url: str, path: str, body: object) -> None:
    """The worker's answer to a failed generation: uvicorn's plain-text 500, after which
    it closes the connection (with no `Connection: close` header to warn a client that
    would reuse it). Sent as a keep-alive request: it only returns once the server closed."""
    payload = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    answer = await raw_request(url, head + payload, timeout_s=30)
    assert answer.status == 500
    assert answer.headers["content-type"].startswith("text/plain")
    assert answer.body == b"Internal Server Error"


def _kill(pid: int) -> None:
    import os

    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module", params=["sim", "real"])
def contract(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    directory = tmp_path_factory.mktemp(f"contract-{request.param}")
    no_weights = directory / "missing-weights"
    no_weights.mkdir()
    if request.param == "sim":
        image, video = start_simworkers(
            [
                [*SIM_FAST, "--task-type", "TI2I", "--model-path", "ckpt/1"],
                [*SIM_FAST, "--task-type", "T2V"],
            ],
            directory,
        )
        contract = Contract("sim", image, video, "ckpt/1", "ckpt/2", str(no_weights))
    else:
        require_sglang()
        models = make_models(directory / "models")
        env = plugin_env(step_s=0.01, warmup_s=1.0)
        image, video = start_real_workers([models["image"], models["video"]], directory, env)
        contract = Contract(
            "real", image, video, str(models["image"]), str(models["image-v2"]), str(no_weights)
        )
    try:
        yield contract
    finally:
        image.stop()
        video.stop()


def test_readiness_goes_from_a_closed_port_to_an_empty_503_to_200(contract: Contract) -> None:
    for worker in (contract.image, contract.video):
        assert worker.readiness[0] == "refused", worker.readiness
        assert worker.readiness[-2:] == ["503 empty", "200"], worker.readiness


async def test_error_bodies_have_the_workers_shapes(
    contract: Contract, http: httpx.AsyncClient
) -> None:
    url = contract.image.url
    assert (await http.get(f"{url}/nope")).json() == {"detail": "Not Found"}
    wrong_method = await http.get(f"{url}/v1/images/generations")
    assert wrong_method.status_code == 405
    assert wrong_method.json() == {"detail": "Method Not Allowed"}
    missing = await http.get(f"{url}/v1/models/other")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    served = (await http.get(f"{url}/v1/models")).json()["data"][0]["id"]
    assert (await http.get(f"{url}/v1/models/{served}")).json()["id"] == served
    no_prompt = await http.post(f"{url}/v1/images/generations", json={"size": "8x8"})
    assert no_prompt.status_code == 422
    assert no_prompt.json()["detail"][0]["loc"] == ["body", "prompt"]
    bad_size = await http.post(f"{url}/v1/images/generations", json={"prompt": "p", "size": "big"})
    assert bad_size.status_code == 400 and "size" in bad_size.json()["detail"]
    no_image = await http.post(
        f"{url}/v1/images/edits", data={"prompt": "p"}, files={"other": ("a.txt", b"x")}
    )
    assert no_image.status_code == 422
    assert no_image.json() == {"detail": "Field 'image' or 'url' is required"}
    truncated = await http.post(
        f"{url}/v1/images/edits",
        content=b"--x\r\nnonsense",
        headers={"content-type": "multipart/form-data; boundary=x"},
    )
    assert truncated.status_code == 422
    assert truncated.json()["detail"][0]["loc"] == ["body", "prompt"]
    video = await http.post(f"{url}/v1/videos", json={"prompt": "p"})
    assert video.status_code == 400 and "VIDEO" in video.json()["detail"]
    image = await http.post(f"{contract.video.url}/v1/images/generations", json={"prompt": "p"})
    assert image.status_code == 400 and "IMAGE" in image.json()["detail"]
    await assert_plain_500_then_close(
        url, "/v1/images/generations", {"prompt": f"{FAIL_MARKER} p", "size": "16x16"}
    )


async def test_images_are_real_files_of_the_requested_size(
    contract: Contract, http: httpx.AsyncClient
) -> None:
    url = contract.image.url
    answer = await http.post(
        f"{url}/v1/images/generations",
        json={
            "prompt": "p",
            "size": "40x24",
            "n": 2,
            "output_format": "png",
            "num_inference_steps": 2,
        },
    )
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert [d["url"] for d in data] == [
        f"/v1/images/{answer.json()['id']}/content?variant={i}" for i in range(2)
    ]
    assert [d["b64_json"] for d in data] == [None, None]
    for entry in data:
        content = await http.get(url + entry["url"])
        assert content.headers["content-type"] == "image/png"
        assert image_size(content.content) == (40, 24)
    unknown = await http.get(f"{url}/v1/images/{answer.json()['id']}x/content")
    assert unknown.status_code == 404 and unknown.json() == {"detail": "Image not found"}
    jpeg = media.encode_jpeg(100, 30, seed=4)
    edit = await http.post(
        f"{url}/v1/images/edits",
        data={"prompt": "p", "size": "48x32", "num_inference_steps": "2"},
        files={"image": ("in.jpg", jpeg, "image/jpeg")},
    )
    assert edit.status_code == 200, edit.text
    edited = base64.b64decode(edit.json()["data"][0]["b64_json"])
    assert edited[:2] == b"\xff\xd8" and image_size(edited) == (48, 32)


async def test_video_jobs_from_multipart_list_range_and_delete(
    contract: Contract, http: httpx.AsyncClient
) -> None:
    url = contract.video.url
    ids = []
    for index in range(3):
        created = await http.post(
            f"{url}/v1/videos",
            files={
                "prompt": (None, f"v{index}"),
                "seconds": (None, "1"),
                "fps": (None, "4"),
                "size": (None, "32x32"),
                "num_inference_steps": (None, "2"),
            },
        )
        assert created.status_code == 200 and created.json()["status"] == "queued"
        assert created.json()["seconds"] == "1" and created.json()["size"] == "32x32"
        ids.append(created.json()["id"])

    async def completed() -> bool:
        jobs = (await http.get(f"{url}/v1/videos", params={"limit": 100})).json()
        return all(job["status"] == "completed" for job in jobs["data"] if job["id"] in ids)

    await wait_until(completed, timeout_s=60)
    listed = (await http.get(f"{url}/v1/videos", params={"limit": 100})).json()["data"]
    mine = [job["id"] for job in listed if job["id"] in ids]
    # newest first by `created_at` (seconds); jobs of the same second keep creation order
    created_at = {job["id"]: job["created_at"] for job in listed}
    assert mine == sorted(ids, key=lambda i: -created_at[i])
    first = (await http.get(f"{url}/v1/videos", params={"limit": 2, "order": "asc"})).json()
    rest = (
        await http.get(
            f"{url}/v1/videos", params={"limit": 100, "order": "asc", "after": first["last_id"]}
        )
    ).json()
    ascending = [j["id"] for j in first["data"] + rest["data"]]
    assert [i for i in ascending if i in ids] == ids and first["has_more"] is True
    assert rest["has_more"] is False
    too_many = await http.get(f"{url}/v1/videos", params={"limit": 101})
    assert too_many.status_code == 422
    done = (await http.get(f"{url}/v1/videos/{ids[0]}")).json()
    assert done["progress"] == 100 and done["num_outputs"] == 1 and done["urls"] == [None]
    whole = await http.get(f"{url}/v1/videos/{ids[0]}/content")
    assert whole.headers["content-type"] == "video/mp4"
    assert len(whole.content) == int(whole.headers["content-length"]) > 200
    assert whole.content[4:8] == b"ftyp"
    part = await http.get(f"{url}/v1/videos/{ids[0]}/content", headers={"range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole.content[100:200]
    deleted = await http.delete(f"{url}/v1/videos/{ids[0]}")
    assert deleted.json()["status"] == "deleted"
    gone = await http.get(f"{url}/v1/videos/{ids[0]}")
    assert gone.status_code == 404 and gone.json() == {"detail": "Video not found"}

    failing = await http.post(
        f"{url}/v1/videos",
        json={"prompt": f"{FAIL_MARKER} v", "seconds": 1, "fps": 4, "size": "32x32"},
    )
    failed_id = failing.json()["id"]

    async def failed() -> bool:
        return (await http.get(f"{url}/v1/videos/{failed_id}")).json()["status"] == "failed"

    await wait_until(failed, timeout_s=60)
    job = (await http.get(f"{url}/v1/videos/{failed_id}")).json()
    assert FAIL_MARKER in job["error"]["message"]
    assert job["file_path"] is None and job["urls"] is None and job["num_outputs"] is None
    assert (await http.get(f"{url}/v1/videos/{failed_id}/content")).status_code == 404


async def test_sleep_refit_and_checksums_follow_the_contract(
    contract: Contract, http: httpx.AsyncClient
) -> None:
    url = contract.image.url
    before = (await http.post(f"{url}/get_weights_checksum", json={})).json()
    await assert_plain_500_then_close(url, "/update_weights_from_disk", b"")
    no_path = await http.post(f"{url}/update_weights_from_disk", json={})
    assert no_path.status_code == 400 and no_path.json()["success"] is False
    broken = await http.post(
        f"{url}/update_weights_from_disk", json={"model_path": contract.no_weights}
    )
    assert broken.status_code == 400 and broken.json()["success"] is False
    done = await http.post(
        f"{url}/update_weights_from_disk", json={"model_path": contract.weights_v2}
    )
    assert done.status_code == 200 and done.json()["success"] is True
    after = (await http.post(f"{url}/get_weights_checksum", json={})).json()
    assert after.keys() == before.keys() and after != before

    released = await http.post(f"{url}/release_memory_occupation")
    assert released.json()["sleeping"] is True and released.json()["success"] is True
    again = await http.post(f"{url}/release_memory_occupation")
    assert again.json() == {"success": True, "sleeping": True, "message": "already sleeping"}
    assert (await http.get(f"{url}/health")).status_code == 200
    await assert_plain_500_then_close(url, "/v1/images/generations", {"prompt": "p"})
    refit = await http.post(
        f"{url}/update_weights_from_disk", json={"model_path": contract.weights_v1}
    )
    assert refit.status_code == 500 and "sleeping" in refit.json()["message"]
    rollout = await http.post(f"{url}/rollout/generate", json={"prompt": "p", "seed": 1})
    assert rollout.status_code == 500
    assert rollout.json() == {"detail": "Server is sleeping. Call resume_memory_occupation first."}
    woken = await http.post(f"{url}/resume_memory_occupation")
    assert woken.json()["sleeping"] is False and woken.json()["success"] is True
    awake = await http.post(f"{url}/resume_memory_occupation")
    assert awake.json() == {"success": True, "sleeping": False, "message": "already awake"}
    back = await http.post(
        f"{url}/update_weights_from_disk", json={"model_path": contract.weights_v1}
    )
    assert back.json()["success"] is True
    assert (await http.post(f"{url}/get_weights_checksum", json={})).json() == before


def _tensor_shape(blob: bytes) -> list[int]:
    header_len = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8 : 8 + header_len])["t"]["shape"]


async def test_rollout_answers_msgpack_with_safetensors_tensors(
    contract: Contract, http: httpx.AsyncClient
) -> None:
    answer = await http.post(
        f"{contract.image.url}/rollout/generate",
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
    assert len(samples) == 3
    # one request: every sample carries its id and its seed
    assert len({s["request_id"] for s in samples}) == 1
    assert [s["seed"] for s in samples] == [5, 5, 5]
    assert all(s["prompt"] == "p" for s in samples)
    log_probs = samples[0]["rollout_log_probs"]
    assert log_probs["__tensor__"] is True and log_probs["dtype"] == "torch.float32"
    assert _tensor_shape(log_probs["data"]) == log_probs["shape"] == [4]
    output = samples[0]["generated_output"]
    assert output["shape"] == _tensor_shape(output["data"]) == [3, 32, 64]
    await assert_plain_500_then_close(contract.image.url, "/rollout/generate", {"prompt": "p"})
    failed = await http.post(
        f"{contract.image.url}/rollout/generate", json={"prompt": FAIL_MARKER, "seed": 1}
    )
    assert failed.status_code == 500 and FAIL_MARKER in failed.json()["detail"]


async def test_a_dead_backend_fails_health_and_every_post_for_good(
    contract: Contract, http: httpx.AsyncClient
) -> None:
    """Last in this module: it leaves the image worker broken, as a real one stays."""
    url = contract.image.url
    contract.break_backend()

    async def unhealthy() -> bool:
        return (await http.get(f"{url}/health")).status_code == 503

    await wait_until(unhealthy, timeout_s=30)
    health = (await http.get(f"{url}/health")).json()
    assert health["status"] == "unhealthy" and health["error"]

    async def refuses_posts() -> bool:
        # The real worker's POST gate learns of the failure from a 1 s monitor, later
        # than /health, which looks for itself.
        try:
            answer = await http.post(f"{url}/v1/images/generations", json={"prompt": "p"})
        except httpx.TransportError:  # a plain 500 before that closed the connection
            return False
        return answer.status_code == 503 and answer.json() == {"error": health["error"]}

    await wait_until(refuses_posts, timeout_s=10, interval_s=0.2)
    assert (await http.get(f"{url}/liveness")).status_code == 200
    assert (await http.get(f"{url}/v1/models")).status_code == 200


# ---- the simulator's own knobs (no real counterpart) ---------------------------------------


async def test_simulator_faults_ports_and_sigterm(http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, "--sec-per-mpx-step", "0")
        wrong = await http.post(f"{worker.url}/_sim/faults", json={"fail_rate": 3})
        assert wrong.status_code == 400
        await http.post(f"{worker.url}/_sim/faults", json={"fail_rate": 1.0})
        failed = await http.post(f"{worker.url}/v1/images/generations", json={"prompt": "p"})
        assert failed.status_code == 500

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
        many = await start_simworker(
            nursery, "--sec-per-mpx-step", "0", "--port", str(second), port=pair
        )
        await http.post(f"{many.url}/_sim/faults", json={"slow_body_bps": 10})
        other = (await http.get(f"http://127.0.0.1:{second}/_sim/state")).json()
        assert other["faults"]["slow_body_bps"] == 0 and other["port"] == second

        many.process.send_signal(signal.SIGTERM)
        with trio.fail_after(10):
            assert await many.process.wait() == 0
        nursery.cancel_scope.cancel()


def test_model_dirs_hold_two_weight_versions(tmp_path: Path) -> None:
    """The model script needs no torch, so it is checked even where sglang is missing."""
    pytest.importorskip("dsrouter_sglang_testplugin")
    models = make_models(tmp_path)
    assert set(models) == {"image", "image-v2", "video", "video-v2"}
    for path in models.values():
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] in ("Flux2Pipeline", "WanPipeline")
        (weights,) = (path / "transformer").glob("*.safetensors")
        assert _tensor_names(weights.read_bytes()) == {"proj.weight", "proj.bias"}
    image, image_v2 = (models[k] / "transformer" for k in ("image", "image-v2"))
    assert next(image.iterdir()).read_bytes() != next(image_v2.iterdir()).read_bytes()


def _tensor_names(blob: bytes) -> set[str]:
    header_len = struct.unpack("<Q", blob[:8])[0]
    return set(json.loads(blob[8 : 8 + header_len])) - {"__metadata__"}
