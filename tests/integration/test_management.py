"""Worker management, health and the Miles aliases through a real router process."""

from pathlib import Path

import httpx
import trio

from tests.support import router_process, start_simworker, wait_until, worker_state

FAST_HEALTH = """
[health]
interval_s = 0.2
timeout_s = 1.0
failure_threshold = 2
recovery_threshold = 2
breaker_open_s = 60
"""


async def test_register_dedupe_inspect_and_delete(tmp_path: Path, http: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery)
        async with router_process([], config=FAST_HEALTH, tmp_path=tmp_path) as router:
            response = await http.get(f"{router.url}/health")
            assert response.status_code == 503
            assert response.json()["status"] == "unhealthy"

            response = await http.post(f"{router.url}/workers", json={"url": worker.url + "/"})
            assert response.status_code == 200
            body = response.json()
            assert body["status"] == "success"
            registered = body["worker"]
            assert registered["url"] == worker.url
            assert registered["worker_id"] == worker.url.replace(":", "%3A").replace("/", "%2F")
            assert registered["display_id"] == f"127.0.0.1:{worker.port}"
            assert registered["is_dead"] is False and registered["active_requests"] == 0

            again = await http.post(f"{router.url}/workers", params={"worker_url": worker.url})
            assert again.status_code == 200
            assert len((await http.get(f"{router.url}/workers")).json()["workers"]) == 1

            health = (await http.get(f"{router.url}/health")).json()
            assert health == health | {
                "status": "healthy",
                "healthy_workers": 1,
                "total_workers": 1,
                "dead_workers": 0,
                "sleeping_workers": 0,
            }

            one = await http.get(f"{router.url}/workers/{registered['worker_id']}")
            assert one.status_code == 200 and one.json()["worker"]["url"] == worker.url
            assert one.json()["worker"]["video_support"] is False

            missing = await http.get(f"{router.url}/workers/http%3A%2F%2Fnowhere%3A1")
            assert missing.status_code == 404 and "error" in missing.json()
            undecodable = await http.get(f"{router.url}/workers/%FF%FE")
            assert undecodable.status_code == 400

            deleted = await http.delete(f"{router.url}/workers/{registered['worker_id']}")
            assert deleted.json() == {"status": "success", "worker_id": registered["worker_id"]}
            assert (await http.get(f"{router.url}/workers")).json()["workers"] == []
            gone = await http.delete(f"{router.url}/workers/{registered['worker_id']}")
            assert gone.status_code == 404
        nursery.cancel_scope.cancel()


async def test_bad_registrations_get_400_naming_the_problem(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with router_process([], tmp_path=tmp_path) as router:
        cases = [
            ({"params": {"url": "http://169.254.169.254"}}, "blocked"),
            ({"params": {"url": "http://metadata.google.internal"}}, "blocked"),
            ({"params": {"url": "http://[fe80::1]:80"}}, "blocked"),
            ({"params": {"url": "ftp://host:1"}}, "http"),
            ({"params": {"url": "http://u:p@host:1"}}, "credentials"),
            ({"params": {"url": "http://host:1/v1"}}, "path"),
            ({"content": b"{not json", "headers": {"content-type": "application/json"}}, "JSON"),
            ({"json": ["http://host:1"]}, "object"),
            ({}, "required"),
        ]
        for kwargs, fragment in cases:
            response = await http.post(f"{router.url}/workers", **kwargs)
            assert response.status_code == 400, kwargs
            assert fragment in response.json()["error"], (kwargs, response.json())
        miles = await http.post(f"{router.url}/add_worker", params={"url": "http://169.254.1.1"})
        assert miles.status_code == 400 and "blocked" in miles.json()["error"]


async def test_put_validates_and_quarantines_and_recovers(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery)
        async with router_process(
            ["--worker-urls", worker.url], config=FAST_HEALTH, tmp_path=tmp_path
        ) as router:
            wid = worker.url.replace(":", "%3A").replace("/", "%2F")
            await wait_until(lambda: _healthy(http, router.url, 1))
            for bad in (b"", b"[]", b"{}", b'{"is_dead": "yes"}', b'{"colour": true}', b"{x"):
                response = await http.put(
                    f"{router.url}/workers/{wid}",
                    content=bad,
                    headers={"content-type": "application/json"},
                )
                assert response.status_code == 400, bad
            response = await http.put(f"{router.url}/workers/{wid}", json={"is_dead": True})
            assert response.status_code == 200 and response.json()["worker"]["is_dead"] is True
            assert (await http.get(f"{router.url}/health")).status_code == 503
            routed = await http.post(f"{router.url}/v1/images/generations", json={"prompt": "x"})
            assert routed.status_code == 503
            assert routed.json() == {"error": "No healthy workers available in the pool"}
            response = await http.put(
                f"{router.url}/workers/{wid}",
                json={"is_dead": False, "refresh_video_support": True},
            )
            assert response.json()["worker"]["is_dead"] is False
            assert (await http.get(f"{router.url}/health")).status_code == 200
        nursery.cancel_scope.cancel()


async def test_killed_worker_is_quarantined_and_recovers_without_any_call(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        first = await start_simworker(nursery)
        second = await start_simworker(nursery)
        async with router_process(
            ["--worker-urls", first.url, second.url], config=FAST_HEALTH, tmp_path=tmp_path
        ) as router:
            await wait_until(lambda: _healthy(http, router.url, 2))
            await first.kill()

            async def first_dead() -> bool:
                return (await worker_state(http, router.url, first.url))["is_dead"]

            await wait_until(first_dead)
            health = (await http.get(f"{router.url}/health")).json()
            assert (health["healthy_workers"], health["dead_workers"]) == (1, 1)
            miles = (await http.get(f"{router.url}/health_workers")).json()["workers"]
            assert {w["url"]: w["is_dead"] for w in miles} == {first.url: True, second.url: False}
            for _ in range(6):
                response = await http.post(
                    f"{router.url}/v1/images/generations", json={"prompt": "p", "size": "64x64"}
                )
                assert response.status_code == 200
                assert response.headers["x-dsrouter-worker"] == f"127.0.0.1:{second.port}"

            await start_simworker(nursery, port=first.port)

            async def first_back() -> bool:
                state = await worker_state(http, router.url, first.url)
                return not state["is_dead"] and state["state"] == "healthy"

            await wait_until(first_back)
            assert (await http.get(f"{router.url}/health")).json()["healthy_workers"] == 2
        nursery.cancel_scope.cancel()


async def test_miles_aliases_answer_in_the_miles_shapes(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery)
        async with router_process([], tmp_path=tmp_path) as router:
            added = await http.post(f"{router.url}/add_worker", params={"url": worker.url})
            assert added.json() == {"status": "success", "worker_urls": [worker.url]}
            added = await http.post(f"{router.url}/add_worker", json={"url": worker.url + "/"})
            assert added.json()["worker_urls"] == [worker.url]
            assert (await http.get(f"{router.url}/list_workers")).json() == {"urls": [worker.url]}
            health = (await http.get(f"{router.url}/health_workers")).json()
            assert health == {
                "workers": [
                    {
                        "url": worker.url,
                        "active_requests": 0,
                        "is_dead": False,
                        "consecutive_failures": 0,
                    }
                ]
            }
            image = await http.post(
                f"{router.url}/generate",
                json={"prompt": "a cat", "size": "32x32", "response_format": "b64_json"},
            )
            assert image.status_code == 200 and image.json()["data"][0]["b64_json"]
        nursery.cancel_scope.cancel()


async def test_sigterm_stops_the_router_cleanly(tmp_path: Path) -> None:
    async with router_process([], tmp_path=tmp_path) as router:
        with trio.fail_after(10):
            assert await router.stop() == 0


async def test_broken_config_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    import sys

    path = tmp_path / "router.toml"
    path.write_text("[health]\ninterval_s = 'ten'\n[routing]\nalgorithm = 'best'\n[colour]\n")
    result = await trio.run_process(
        [sys.executable, "-m", "dsrouter", "run", "--config", str(path)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 3, lines
    assert all(str(path) in line for line in lines)
    assert result.stdout == b""


async def _healthy(http: httpx.AsyncClient, router: str, count: int) -> bool:
    return (await http.get(f"{router}/health")).json()["healthy_workers"] == count
