"""Generation routes of the simulated worker: images, videos, meshes and RL rollouts.

Shapes, defaults and error codes follow `WORKER_API.md` sections 5-7 and 10 (sglang 0.5.23).
Service time is `sec_per_mpx_step x megapixels x steps x frames x outputs / speed`, the same
unit the router's cost model predicts, so scheduling benchmarks measure the policy and not a
mismatch between the two.
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from collections import OrderedDict
from typing import Any

import msgpack
import trio

from dsrouter.simworker import media
from dsrouter.simworker.asgi import (
    HTTPError,
    Request,
    Response,
    Uncaught,
    json_response,
    missing_field,
    parse_json_object,
    plain_500,
)
from dsrouter.simworker.forms import Form, boundary_of, read_form
from dsrouter.simworker.options import IMAGE_INPUT_ACCEPTED, IMAGE_INPUT_REQUIRED, TASK_OUTPUTS
from dsrouter.simworker.state import Asleep, GenerationFailed, Job, SimWorker, now

_SIZE = re.compile(r"^(\d+)[xX](\d+)$")
MAX_SIDE = 4096
DEFAULT_VIDEO_BYTES = 1 << 20
VIDEO_SIZE = (832, 480)
FORMATS = ("png", "jpeg", "jpg", "webp")
THREAD_PIXELS = 256 * 256
FAIL_MARKER = "DSROUTER_FAIL"
"""A prompt containing this fails its generation, as with the real worker's test plugin
(`sglang/dsrouter_sglang_testplugin`), so one test drives both implementations."""


def _model_error(request_id: str) -> str:
    """The scheduler's error text for a failed generation (the test plugin's own words)."""
    return (
        f"Error executing request {request_id}: prompt contains {FAIL_MARKER}: "
        "generation failed on purpose"
    )


def _fails(payload: dict[str, Any], request_id: str) -> str | None:
    """The model's error for this request, or None when it succeeds."""
    if FAIL_MARKER in str(payload.get("prompt", "")):
        return _model_error(request_id)
    return None


def _task(worker: SimWorker, output: str, requested: Any, has_image: bool | None) -> str:
    """The task a request runs as, or the 400 a worker gives when none fits."""
    tasks = [t for t in worker.options.task_types if TASK_OUTPUTS[t] == output]
    if not tasks:
        raise HTTPError(
            400,
            {
                "detail": f"The pipeline of {worker.options.model_path} does not "
                f"support {output} output"
            },
        )
    if requested is not None:
        if requested not in tasks:
            raise HTTPError(
                400, {"detail": f"task_type {requested!r} is not supported; supported: {tasks}"}
            )
        return requested
    if has_image is None:
        return tasks[0]
    fitting = [
        t
        for t in tasks
        if (t in IMAGE_INPUT_ACCEPTED) == has_image
        or (not has_image and t not in IMAGE_INPUT_REQUIRED)
    ]
    if not fitting:
        need = "requires" if not has_image else "does not accept"
        raise HTTPError(400, {"detail": f"task {tasks[0]} {need} an input image"})
    return fitting[0]


def _positive_int(payload: dict[str, Any], key: str) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    try:
        number = int(value)
    except (TypeError, ValueError, OverflowError):
        raise HTTPError(400, {"detail": f"{key} must be an integer"}) from None
    if number <= 0:
        raise HTTPError(400, {"detail": f"{key} must be > 0"})
    return number


def _dimensions(payload: dict[str, Any], default: tuple[int, int] | None) -> tuple[int, int]:
    width, height = _positive_int(payload, "width"), _positive_int(payload, "height")
    if width and height:
        size = (width, height)
    elif payload.get("size"):
        match = _SIZE.match(str(payload["size"]).strip())
        if not match:
            raise HTTPError(
                400,
                {
                    "detail": f"Invalid size {payload['size']!r}; expected "
                    "'WIDTHxHEIGHT', e.g. '1024x1024'"
                },
            )
        size = (int(match.group(1)), int(match.group(2)))
    else:
        size = default or (1024, 1024)
    if not all(0 < side <= MAX_SIDE for side in size):
        raise HTTPError(
            400,
            {
                "detail": f"size {size[0]}x{size[1]} is outside 1..{MAX_SIDE} "
                "(a limit of the simulator)"
            },
        )
    return size


def _outputs(payload: dict[str, Any]) -> int:
    raw = payload.get("n", payload.get("num_outputs_per_prompt", 1))
    try:
        return min(max(int(raw or 1), 1), 10)
    except (TypeError, ValueError):
        raise HTTPError(400, {"detail": "n must be an integer"}) from None


def _seed(payload: dict[str, Any], index: int) -> int:
    seed = payload.get("seed")
    if isinstance(seed, list) and seed:
        seed = seed[index % len(seed)]
    if isinstance(seed, int) and not isinstance(seed, bool):
        return seed
    return zlib.crc32(f"{payload.get('prompt')}|{index}".encode()) & 0xFFFF


_ENCODED: OrderedDict[tuple[int, int, str, int], bytes] = OrderedDict()
ENCODED_CACHE_ENTRIES = 32
CACHED_IMAGE_MAX_BYTES = 4 << 20


async def _render(width: int, height: int, fmt: str, seeds: list[int]) -> list[bytes]:
    """Encoded images, cached by (size, format, seed).

    On a GPU host the image costs GPU time, which `--sec-per-mpx-step` models; encoding it in
    pure Python here would add host CPU time that no real worker spends and would skew the
    router's benchmarks, so repeated outputs are served from a small cache. Big encodes run
    off the event loop so probes keep answering.
    """
    images = []
    for seed in seeds:
        key = (width, height, fmt, seed)
        image = _ENCODED.get(key)
        if image is None:
            if width * height <= THREAD_PIXELS:
                image = media.encode_image(width, height, fmt, seed)
            else:
                image = await trio.to_thread.run_sync(media.encode_image, width, height, fmt, seed)
            if len(image) <= CACHED_IMAGE_MAX_BYTES:
                _ENCODED[key] = image
                while len(_ENCODED) > ENCODED_CACHE_ENTRIES:
                    _ENCODED.popitem(last=False)
        else:
            _ENCODED.move_to_end(key)
        images.append(image)
    return images


async def _generate(worker: SimWorker, units: float, fails: str | None = None) -> float:
    """Run a generation; a failure is the real worker's uncaught exception (plain 500)."""
    if worker.roll(worker.faults.fail_rate):
        raise Uncaught
    try:
        return await worker.generate(units, fails=fails)
    except GenerationFailed:
        raise Uncaught from None


# ---- images -------------------------------------------------------------------------------


def _image_options(
    payload: dict[str, Any], default_format: str, default_size: tuple[int, int] | None
) -> dict[str, Any]:
    response_format = payload.get("response_format") or default_format
    if response_format not in ("url", "b64_json"):
        raise HTTPError(
            400, {"detail": f"response_format must be 'url' or 'b64_json', got {response_format!r}"}
        )
    output_format = payload.get("output_format")
    if output_format is not None and output_format not in FORMATS:
        raise HTTPError(400, {"detail": f"output_format must be one of {FORMATS}"})
    return {
        "size": _dimensions(payload, default_size),
        "n": _outputs(payload),
        "steps": _positive_int(payload, "num_inference_steps"),
        "response_format": response_format,
        "format": media.image_format(output_format, payload.get("background")),
    }


async def _image_answer(
    worker: SimWorker, payload: dict[str, Any], options: dict[str, Any]
) -> Response:
    (width, height), n = options["size"], options["n"]
    steps = options["steps"] or worker.options.default_steps
    frames = _positive_int(payload, "num_frames") or 1
    units = width * height / 1e6 * steps * frames * n
    seconds = await _generate(worker, units, _fails(payload, worker.new_id()))
    seeds = [_seed(payload, i) for i in range(n)]
    images = await _render(width, height, options["format"], seeds)
    image_id = worker.new_id()
    worker.store_images(image_id, options["format"], images)
    extension = "png" if options["format"] == "png" else "jpg"
    data = []
    for index, image in enumerate(images):
        url = f"/v1/images/{image_id}/content" + (f"?variant={index}" if n > 1 else "")
        by_url = options["response_format"] == "url"
        data.append(
            {
                "b64_json": None if by_url else _b64(image),
                "url": url if by_url else None,
                "revised_prompt": payload.get("prompt"),
                "file_path": f"/sim/outputs/{image_id}{f'_{index}' if n > 1 else ''}.{extension}",
                "resize": None,
            }
        )
    return json_response(
        200,
        {
            "id": image_id,
            "created": now(),
            "data": data,
            "peak_memory_mb": 1024.0,
            "inference_time_s": round(seconds, 6),
            "usage": None,
        },
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def images_generations(worker: SimWorker, request: Request) -> Response:
    payload = parse_json_object(await request.read())
    if "prompt" not in payload:
        raise missing_field("prompt", payload)
    _task(worker, "IMAGE", payload.get("task_type"), None)
    size = None if "size" in payload and payload["size"] is None else (1024, 1024)
    options = _image_options(payload, "url", size)
    return await _image_answer(worker, payload, options)


async def images_edits(worker: SimWorker, request: Request) -> Response:
    boundary = boundary_of(request.header("content-type"))
    if boundary is None:
        await request.drain()
        raise missing_field("prompt", None)
    form = await read_form(request, boundary)
    uploads = form.uploads("image", "image[]")
    urls = form.fields.get("url", []) + form.fields.get("url[]", [])
    if form.text("prompt") is None:
        raise missing_field("prompt", None)
    if not uploads and not urls:
        raise HTTPError(422, {"detail": "Field 'image' or 'url' is required"})
    bad = [u.filename for u in uploads if not u.size]
    if bad:
        raise HTTPError(400, {"detail": f"empty upload {bad[0]!r}"})
    payload: dict[str, Any] = {k: v[0] for k, v in form.fields.items()}
    default_size = (media.image_dimensions(uploads[0].head) if uploads else None) or (1024, 1024)
    _task(worker, "IMAGE", payload.get("task_type"), None)
    options = _image_options(payload, "b64_json", default_size)
    return await _image_answer(worker, payload, options)


async def image_content(worker: SimWorker, request: Request, image_id: str) -> Response:
    stored = worker.images.get(image_id)
    if stored is None:
        raise HTTPError(404, {"detail": "Image not found"})
    fmt, images = stored
    variant = request.query.get("variant", ["0"])[0]
    if not variant.isdigit() or int(variant) >= len(images):
        raise HTTPError(404, {"detail": "Image variant not found"})
    extension = "png" if fmt == "png" else "jpg"
    return Response(
        200,
        images[int(variant)],
        media.CONTENT_TYPES[fmt],
        [("content-disposition", f'attachment; filename="{image_id}.{extension}"')],
    )


# ---- videos and meshes --------------------------------------------------------------------


async def _job_payload(request: Request) -> tuple[dict[str, Any], Form | None]:
    boundary = boundary_of(request.header("content-type"))
    if boundary is not None:
        form = await read_form(request, boundary)
        payload: dict[str, Any] = {k: v[0] for k, v in form.fields.items()}
        return payload, form
    raw = await request.read()
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise HTTPError(400, {"detail": f"Invalid request body: {exc}"}) from None
    if not isinstance(payload, dict):
        raise HTTPError(400, {"detail": "Invalid request body: expected a JSON object"})
    return payload, None


async def videos_create(worker: SimWorker, request: Request) -> Response:
    payload, form = await _job_payload(request)
    if not payload.get("prompt"):
        raise HTTPError(400, {"detail": "prompt is required"})
    has_image = bool(
        payload.get("input_reference")
        or payload.get("reference_url")
        or (form and form.uploads("input_reference"))
    )
    _task(worker, "VIDEO", payload.get("task_type"), has_image)
    seconds = _positive_int(payload, "seconds") or 4
    fps = _positive_int(payload, "fps") or 24
    frames = _positive_int(payload, "num_frames") or seconds * fps
    width, height = _dimensions(payload, VIDEO_SIZE)
    n = _outputs(payload)
    steps = _positive_int(payload, "num_inference_steps") or worker.options.default_steps
    video_id = worker.new_id()
    record = {
        "id": video_id,
        "object": "video",
        "model": payload.get("model") or worker.options.served_model_name,
        "status": "queued",
        "progress": 0,
        "created_at": now(),
        "size": f"{width}x{height}",
        "seconds": str(round(frames / fps)),
        "quality": "standard",
        "url": None,
        "urls": None,
        "remixed_from_video_id": None,
        "completed_at": None,
        "expires_at": None,
        "error": None,
        "file_path": f"/sim/outputs/{video_id}.mp4",
        "file_paths": None,
        "num_outputs": None,
        "peak_memory_mb": None,
        "inference_time_s": None,
        "revised_prompt": None,
        "action": None,
        "lidar": None,
    }
    size = worker.options.video_bytes
    job = worker.add_job(worker.videos, record, DEFAULT_VIDEO_BYTES if size is None else size, n)
    units = width * height / 1e6 * steps * frames * n
    fails = _fails(payload, video_id)
    worker.nursery.start_soon(_run_job, worker, job, units, steps, True, fails)
    return json_response(200, dict(record))


async def meshes_create(worker: SimWorker, request: Request) -> Response:
    if "I2M" not in worker.options.task_types:
        await request.drain()
        return plain_500()
    payload, form = await _job_payload(request)
    has_image = bool(
        payload.get("input_image")
        or payload.get("url")
        or (form and form.uploads("image", "image[]"))
    )
    if not has_image:
        raise missing_field("image", None)
    fmt = payload.get("output_format") or "glb"
    if fmt not in ("glb", "obj"):
        raise HTTPError(400, {"detail": "output_format must be 'glb' or 'obj'"})
    steps = _positive_int(payload, "num_inference_steps") or worker.options.default_steps
    mesh_id = worker.new_id()
    record = {
        "id": mesh_id,
        "object": "mesh",
        "model": payload.get("model") or worker.options.served_model_name,
        "status": "queued",
        "progress": 0,
        "created_at": now(),
        "format": fmt,
        "url": None,
        "completed_at": None,
        "expires_at": None,
        "error": None,
        "file_path": f"/sim/outputs/{mesh_id}.{fmt}",
        "file_size_bytes": None,
        "peak_memory_mb": None,
        "inference_time_s": None,
    }
    job = worker.add_job(worker.meshes, record, 0, 1)
    worker.nursery.start_soon(_run_job, worker, job, steps * 1.0, steps, False)
    return json_response(200, dict(record))


async def _run_job(
    worker: SimWorker,
    job: Job,
    units: float,
    steps: int,
    reports_progress: bool,
    fails: str | None = None,
) -> None:
    """A background job: queued until the scheduler takes it, then progress, then done."""
    record = job.record
    try:
        async with worker.scheduled():
            if worker.sleeping:
                raise Asleep
            if fails is not None:
                raise GenerationFailed(fails)
            if reports_progress:
                record["status"] = "in_progress"
            seconds = worker.service_seconds(units)
            updates = max(1, min(steps, 20))
            for step in range(updates):
                await trio.sleep(seconds / updates)
                if reports_progress:
                    record["progress"] = max(record["progress"], (step + 1) * 99 // updates)
    except GenerationFailed as failure:
        record.update(
            status="failed",
            error={"message": f"Model generation failed. Error from scheduler: {failure}"},
            url=None,
            urls=None,
            file_path=None,
            file_paths=None,
            num_outputs=None,
        )
        return
    if record["object"] == "mesh":
        job.size = len(media.glb_bytes(job.seed)) if record["format"] == "glb" else 64
        record.update(file_size_bytes=job.size)
    else:
        paths = (
            [record["file_path"]]
            if job.variants == 1
            else [f"/sim/outputs/{record['id']}_{i}.mp4" for i in range(job.variants)]
        )
        record.update(
            file_paths=paths, num_outputs=job.variants, url=None, urls=[None] * job.variants
        )
    record.update(
        status="completed",
        progress=100,
        completed_at=now(),
        peak_memory_mb=2048.0,
        inference_time_s=round(seconds, 6),
    )


def _find(store: dict[str, Job], job_id: str, kind: str) -> Job:
    job = store.get(job_id)
    if job is None:
        raise HTTPError(404, {"detail": f"{kind} not found"})
    return job


async def list_jobs(store: dict[str, Job], request: Request) -> Response:
    query = request.query
    order = query.get("order", ["desc"])[0]
    after = query.get("after", [None])[0]
    try:
        limit = int(query.get("limit", ["20"])[0])
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100 or order not in ("asc", "desc"):
        raise HTTPError(
            422,
            {
                "detail": [
                    {
                        "type": "value_error",
                        "loc": ["query", "limit"],
                        "msg": "limit must be 1..100, order asc|desc",
                        "input": query,
                    }
                ]
            },
        )
    # By `created_at` (whole seconds) alone, as the real worker sorts: a stable sort, so
    # jobs of the same second stay in creation order, in both directions.
    jobs = sorted(store.values(), key=lambda j: j.record["created_at"], reverse=order == "desc")
    if after is not None:
        ids = [j.record["id"] for j in jobs]
        jobs = jobs[ids.index(after) + 1 :] if after in ids else []
    page = [dict(j.record) for j in jobs[:limit]]
    return json_response(
        200,
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(jobs) > limit,
        },
    )


async def get_job(store: dict[str, Job], job_id: str, kind: str) -> Response:
    return json_response(200, dict(_find(store, job_id, kind).record))


async def delete_job(store: dict[str, Job], job_id: str, kind: str) -> Response:
    job = _find(store, job_id, kind)
    del store[job_id]
    return json_response(200, {**job.record, "status": "deleted"})


async def job_content(store: dict[str, Job], request: Request, job_id: str, kind: str) -> Response:
    job = _find(store, job_id, kind)
    status = job.record["status"]
    if status not in ("completed", "failed"):
        raise HTTPError(404, {"detail": "Generation is still in-progress"})
    variant = request.query.get("variant", ["0"])[0]
    if status == "failed" or not variant.isdigit() or int(variant) >= job.variants:
        raise HTTPError(404, {"detail": f"{kind} file not found"})
    if job.record["object"] == "mesh":
        fmt = job.record["format"]
        body = media.glb_bytes(job.seed) if fmt == "glb" else b"o mesh\nv 0 0 0\n".ljust(64)
        return Response(
            200,
            body,
            "model/gltf-binary" if fmt == "glb" else "text/plain",
            [("content-disposition", f'attachment; filename="{job_id}.{fmt}"')],
        )
    name = f"{job_id}.mp4" if job.variants == 1 else f"{job_id}_{variant}.mp4"
    return _ranged(request, job.size, job.seed + int(variant), name)


def _ranged(request: Request, size: int, seed: int, name: str) -> Response:
    """The whole file, or one `Range: bytes=a-b` slice as a FileResponse would serve it."""
    headers = [
        ("content-disposition", f'attachment; filename="{name}"'),
        ("accept-ranges", "bytes"),
    ]
    wanted = request.header("range")
    match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip()) if wanted else None
    if match and (match.group(1) or match.group(2)):
        first = int(match.group(1)) if match.group(1) else max(size - int(match.group(2)), 0)
        last = int(match.group(2)) if match.group(1) and match.group(2) else size - 1
        if first >= size or last < first:
            return Response(416, b"", None, [("content-range", f"bytes */{size}")])
        last = min(last, size - 1)
        return Response(
            206,
            _slice(size, seed, first, last + 1),
            "video/mp4",
            [*headers, ("content-range", f"bytes {first}-{last}/{size}")],
            length=last + 1 - first,
        )
    return Response(200, media.artifact_chunks(size, seed), "video/mp4", headers, length=size)


def _slice(size: int, seed: int, start: int, stop: int) -> Any:
    position = 0
    for chunk in media.artifact_chunks(size, seed):
        end = position + len(chunk)
        if end > start and position < stop:
            yield chunk[max(start - position, 0) : stop - position]
        position = end
        if position >= stop:
            return


# ---- rollout ------------------------------------------------------------------------------


async def rollout(worker: SimWorker, request: Request) -> Response:
    """Samples as the real route builds them: one map per output, all carrying the
    request's id and seed; `generated_output` is the decoded output (`[3, H, W]`, or
    `[3, T, H, W]` on a video worker), the trajectory fields are per sample."""
    payload = parse_json_object(await request.read())
    if "prompt" not in payload:
        raise missing_field("prompt", payload)
    width = _positive_int(payload, "width") or 512
    height = _positive_int(payload, "height") or 512
    if max(width, height) > MAX_SIDE:
        raise HTTPError(400, {"detail": "Invalid sampling params: size too large"})
    steps = _positive_int(payload, "num_inference_steps") or worker.options.default_steps
    frames = _positive_int(payload, "num_frames") or 1
    n = _outputs(payload)
    request_id = worker.new_id()
    if worker.roll(worker.faults.fail_rate):
        return json_response(500, {"detail": "Generation failed: injected fault"})
    try:
        seconds = await worker.generate(
            width * height / 1e6 * steps * frames * n, fails=_fails(payload, request_id)
        )
    except GenerationFailed as failure:
        return json_response(500, {"detail": str(failure)})
    seed = payload.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        return plain_500()  # the response model requires an int seed
    full = payload.get("rollout", True)
    video = "VIDEO" in worker.options.output_types and "IMAGE" not in worker.options.output_types
    shape = [3, frames, height, width] if video else [3, height, width]
    samples = []
    for index in range(n):
        base = (seed + index) % 1000 / 1000
        samples.append(
            {
                "request_id": request_id,
                "prompt": payload["prompt"],
                "seed": seed,
                "generated_output": media.constant_tensor(base, shape),
                "rollout_log_probs": media.tensor(
                    [-base - s / steps for s in range(steps)], [steps]
                )
                if full
                else None,
                "rollout_debug_tensors": None,
                "denoising_env": (
                    {
                        "image_kwargs": None,
                        "pos_cond_kwargs": None,
                        "neg_cond_kwargs": None,
                        "guidance": media.tensor([1.0] * steps, [steps]),
                    }
                    if full and payload.get("rollout_return_denoising_env")
                    else None
                ),
                "dit_trajectory": (
                    {
                        "latents": media.tensor([base] * (steps + 1) * 4, [steps + 1, 4]),
                        "timesteps": media.tensor(
                            [1000 * (1 - s / steps) for s in range(steps)], [steps]
                        ),
                        "sigmas": media.tensor(
                            [1 - s / steps for s in range(steps + 1)], [steps + 1]
                        ),
                    }
                    if full and payload.get("rollout_return_dit_trajectory")
                    else None
                ),
                "inference_time_s": round(seconds, 6),
                "peak_memory_mb": 1024.0,
            }
        )
    return Response(200, msgpack.packb(samples, use_bin_type=True), "application/msgpack")
