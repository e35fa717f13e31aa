import pytest

from dsrouter import routes
from dsrouter.config import HealthConfig
from dsrouter.jobs import JobAffinity, JobMap, job_id_from
from dsrouter.policies import LeastRequest
from dsrouter.registry import Registry
from dsrouter.workers_http import WorkerHTTP


@pytest.mark.parametrize(
    ("method", "path", "query", "kind", "upstream", "job_id"),
    [
        ("POST", "/v1/images/generations", b"", routes.CREATE, "/v1/images/generations", None),
        ("POST", "/generate", b"", routes.CREATE, "/v1/images/generations", None),
        ("POST", "/generate_video", b"", routes.CREATE, "/v1/videos", None),
        ("POST", "/v1/videos", b"", routes.CREATE, "/v1/videos", None),
        ("GET", "/v1/videos", b"", routes.LIST, "/v1/videos", None),
        ("GET", "/v1/videos", b"video_id=abc", routes.STICKY, "/v1/videos", "abc"),
        ("GET", "/v1/videos", b"job_id=j1", routes.STICKY, "/v1/videos", "j1"),
        ("GET", "/v1/videos/abc", b"", routes.STICKY, "/v1/videos/abc", "abc"),
        ("DELETE", "/v1/videos/abc", b"", routes.STICKY, "/v1/videos/abc", "abc"),
        ("GET", "/v1/videos/abc/content", b"", routes.STICKY, "/v1/videos/abc/content", "abc"),
        ("GET", "/v1/images/i1/content", b"", routes.STICKY, "/v1/images/i1/content", "i1"),
        ("GET", "/v1/meshes/m1", b"", routes.STICKY, "/v1/meshes/m1", "m1"),
        ("POST", "/rollout/generate", b"", routes.POOL, "/rollout/generate", None),
        ("GET", "/v1/models/some/model", b"", routes.POOL, "/v1/models/some/model", None),
        ("GET", "/generate", b"", routes.POOL, "/generate", None),
    ],
)
def test_classify(method, path, query, kind, upstream, job_id) -> None:
    route = routes.classify(method, path, query)
    assert (route.kind, route.path, route.job_id) == (kind, upstream, job_id)


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"id": "a"}, "a"),
        ({"video_id": "b"}, "b"),
        ({"job_id": "c"}, "c"),
        ({"data": [{"id": "d"}]}, "d"),
        ({"data": []}, None),
        ([1, 2], None),
        ({"id": 5}, None),
    ],
)
def test_job_id_from_create_answers(payload, expected) -> None:
    assert job_id_from(payload) == expected


def test_job_map_evicts_finished_jobs_first() -> None:
    jobs = JobMap(capacity=3)
    jobs.remember("a", "w1", "videos")
    jobs.remember("b", "w1", "videos")
    jobs.remember("c", "w2", "videos")
    jobs.mark_finished("b")
    jobs.remember("d", "w2", "videos")
    assert [jobs.owner(k) for k in "abcd"] == ["w1", None, "w2", "w2"]
    jobs.remember("e", "w3", "videos")
    assert jobs.owner("a") is None and len(jobs) == 3


def test_job_map_at_capacity_evicts_oldest_finished_then_oldest_open() -> None:
    jobs = JobMap(capacity=3)
    jobs.remember("open-1", "w", "videos")
    jobs.remember("open-2", "w", "videos")
    jobs.remember("image", "w", "images", finished=True)
    jobs.remember("open-3", "w", "videos")  # the finished one goes, although newer
    assert jobs.owner("image") is None and len(jobs) == 3
    jobs.remember("open-4", "w", "videos")  # none finished: the oldest goes
    assert jobs.owner("open-1") is None
    assert [jobs.owner(k) for k in ("open-2", "open-3", "open-4")] == ["w", "w", "w"]
    jobs.remember("open-2", "w2", "videos")  # remembering again refreshes, not duplicates
    assert jobs.owner("open-2") == "w2" and len(jobs) == 3


def test_only_images_a_worker_kept_are_remembered() -> None:
    registry = Registry(HealthConfig(), LeastRequest())
    worker, _ = registry.add("http://w:1")
    affinity = JobAffinity(registry, WorkerHTTP(connect_timeout_s=1))
    kept = {"id": "kept", "data": [{"url": "/v1/images/kept/content", "file_path": None}]}
    on_disk = {"id": "disk", "data": [{"b64_json": "eA==", "url": None, "file_path": "/o/d.png"}]}
    gone = {"id": "gone", "data": [{"b64_json": "eA==", "url": None, "file_path": None}]}
    s3 = {"id": "s3", "data": [{"url": "https://bucket/s3.png", "file_path": None}]}
    for payload in (kept, on_disk, gone, s3):
        affinity.learn(None, True, payload, worker, "images")
    assert [registry.jobs.owner(k) for k in ("kept", "disk", "gone", "s3")] == [
        worker.url,
        worker.url,
        None,
        None,
    ]
