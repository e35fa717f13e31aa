"""What an operator's tools see: probes, the index, metrics, and the logs in JSON."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from dsrouter import __version__
from tests.integration.test_ops import IMAGE, INSTANT
from tests.support import routed_pool, router_process, start_simworker, wait_until

TEST_TIMEOUT_S = 40.0
TOKEN = {"authorization": "Bearer admin-secret"}


async def test_livez_stays_200_while_readyz_and_health_say_the_pool_sleeps(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = '[security]\nadmin_token = "admin-secret"\n[health]\ninterval_s = 0.2\n'
    with trio.fail_after(TEST_TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            worker = await start_simworker(nursery, *INSTANT)
            async with router_process(
                ["--worker-urls", worker.url], config=config, tmp_path=tmp_path
            ) as router:

                async def ready() -> bool:
                    return (await http.get(f"{router.url}/readyz")).status_code == 200

                await wait_until(ready)
                index = await http.get(f"{router.url}/")  # public, and not proxied
                assert index.status_code == 200
                assert index.json()["name"] == "dsrouter"
                assert index.json()["version"] == __version__
                assert index.json()["liveness"] == "/livez"
                assert (await http.get(f"{router.url}/readyz")).json() == {"status": "ready"}

                asleep = await http.post(
                    f"{router.url}/release_memory_occupation", json={}, headers=TOKEN
                )
                assert asleep.status_code == 200
                assert (await http.get(f"{router.url}/health")).status_code == 503
                ready = await http.get(f"{router.url}/readyz")
                assert (ready.status_code, ready.json()["reason"]) == (503, "pool is asleep")
                live = await http.get(f"{router.url}/livez")
                assert (live.status_code, live.json()["status"]) == (200, "alive")
            nursery.cancel_scope.cancel()


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


async def test_metrics_name_the_worker_and_carry_build_and_process_series(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = "[health]\ninterval_s = 0.2\nfailure_threshold = 100\n"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with routed_pool(
            http,
            tmp_path,
            INSTANT,
            INSTANT,
            args=["--routing-algorithm", "round-robin"],
            config=config,
        ) as router:
            good, doomed = router.workers
            await doomed.kill()
            for _ in range(2):  # round-robin: one of them is sent to the dead worker first
                answer = await http.post(f"{router.url}/v1/images/generations", json=IMAGE)
                assert answer.status_code == 200
            text = (await http.get(f"{router.url}/metrics")).text
    samples = _samples(text)
    good_id, doomed_id = good.url.removeprefix("http://"), doomed.url.removeprefix("http://")
    assert not [name for name in samples if name.endswith("_created")]
    build = samples["dsrouter_build_info"]
    assert build[0][0]["version"] == __version__ and build[0][1] == 1.0
    assert "process_cpu_seconds_total" in samples and "python_info" in samples
    requests = samples["dsrouter_worker_requests_total"]
    assert ({"worker": good_id, "status": "200"}, 2.0) in requests
    assert ({"worker": doomed_id}, 1.0) in samples["dsrouter_retries_total"]
    failures = samples["dsrouter_worker_failures_total"]
    assert any(labels == {"worker": doomed_id, "source": "request"} for labels, _ in failures)
    assert {labels["worker"] for labels, _ in samples["dsrouter_probes_total"]} >= {good_id}
    waits = samples["dsrouter_queue_wait_seconds_count"]
    assert ({"worker": good_id}, 2.0) in waits
    assert samples["dsrouter_request_ttfb_seconds_count"]
    in_flight = samples["dsrouter_worker_in_flight"]
    assert {labels["worker"] for labels, _ in in_flight} == {good_id, doomed_id}


async def test_json_logs_are_json_on_every_line_and_debug_shows_decisions_and_probes(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = '[logging]\nformat = "json"\n[health]\ninterval_s = 0.2\n'
    with trio.fail_after(TEST_TIMEOUT_S):
        async with routed_pool(
            http, tmp_path, INSTANT, args=["--verbose"], config=config
        ) as router:
            [worker] = router.workers
            answer = await http.post(f"{router.url}/v1/images/generations", json=IMAGE)
            assert answer.status_code == 200
            assert await router.stop() == 0
    records = [json.loads(line) for line in router.output if line.strip()]  # each one JSON
    messages = [(r["logger"], r["level"], r["msg"]) for r in records]
    display = worker.url.removeprefix("http://")
    assert ("dsrouter.announce", "info", f"dsrouter listening on {router.url}") in messages
    assert ("dsrouter", "info", "dsrouter stopped") in messages
    assert any(
        logger == "dsrouter.routing" and level == "debug" and f"chose {display}" in msg
        for logger, level, msg in messages
    )
    assert any(
        logger == "dsrouter.health" and level == "debug" and msg.startswith("probe ")
        for logger, level, msg in messages
    )
    assert not any(msg.startswith("Running on") for _, _, msg in messages)


async def test_a_router_without_workers_says_how_to_add_one(tmp_path: Path) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with router_process([], tmp_path=tmp_path) as router:
            hint = next(line for line in router.output if "no workers configured" in line)
    assert "WARNING" in hint
    assert "--worker-urls" in hint and "--demo" in hint and "dsrouter workers add" in hint
