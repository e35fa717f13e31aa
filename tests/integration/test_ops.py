"""Operations through real router processes: systemd notify, SIGHUP reload, /metrics."""

import json
import os
import signal
from pathlib import Path

import httpx
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.support import (
    NotifySocket,
    free_port,
    healthy,
    routed_pool,
    router_process,
    start_simworker,
    wait_until,
)

INSTANT = ("--sec-per-mpx-step", "0")
IMAGE = {"prompt": "p", "size": "16x16", "response_format": "url"}


async def test_notify_protocol_ready_status_watchdog_stopping(
    tmp_path: Path, http: httpx.AsyncClient, notify: NotifySocket
) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *INSTANT)
        env = {"NOTIFY_SOCKET": notify.name, "WATCHDOG_USEC": "200000"}
        async with router_process(
            ["--worker-urls", worker.url], tmp_path=tmp_path, env=env
        ) as router:
            ready = await notify.next_with("READY")
            assert ready["READY"] == "1"
            assert ready["STATUS"].startswith("1/1 workers healthy, 0 queued")
            await notify.next_with("WATCHDOG")
            await notify.next_with("WATCHDOG")
            await router.stop()
            stopping = await notify.next_with("STOPPING")
            assert stopping["STOPPING"] == "1"
        nursery.cancel_scope.cancel()


async def test_sighup_applies_a_new_worker_list_and_keeps_the_old_config_when_invalid(
    tmp_path: Path, http: httpx.AsyncClient, notify: NotifySocket
) -> None:
    async with trio.open_nursery() as nursery:
        first = await start_simworker(nursery, *INSTANT)
        second = await start_simworker(nursery, *INSTANT)
        head = "[health]\ninterval_s = 0.2\n"
        config = head + f'[[workers]]\nurl = "{first.url}"\n'
        async with router_process(
            [], config=config, tmp_path=tmp_path, env={"NOTIFY_SOCKET": notify.name}
        ) as router:
            await healthy(http, router.url, 1)
            statuses: list[int] = []
            stop = trio.Event()

            async def traffic() -> None:
                """Requests back to back; stops between two (a request cancelled halfway
                would leave httpx's body generator to the garbage collector)."""
                while not stop.is_set():
                    answer = await http.post(f"{router.url}/v1/images/generations", json=IMAGE)
                    statuses.append(answer.status_code)

            async def workers() -> list[str]:
                return [
                    w["url"] for w in (await http.get(f"{router.url}/workers")).json()["workers"]
                ]

            async with trio.open_nursery() as load:
                load.start_soon(traffic)
                await wait_until(lambda: _at_least(statuses, 5))
                (tmp_path / "router.toml").write_text(head + f'[[workers]]\nurl = "{second.url}"\n')
                os.kill(router.pid, signal.SIGHUP)
                assert (await notify.next_with("RELOADING"))["RELOADING"] == "1"
                assert (await notify.next_with("READY"))["READY"] == "1"

                async def switched() -> bool:
                    return await workers() == [second.url]

                await wait_until(switched)
                await healthy(http, router.url, 1)
                served = len(statuses)
                await wait_until(lambda: _at_least(statuses, served + 5))

                (tmp_path / "router.toml").write_text('[health]\ninterval_s = "ten"\n')
                os.kill(router.pid, signal.SIGHUP)
                assert (await notify.next_with("RELOADING"))["RELOADING"] == "1"
                await notify.next_with("READY")
                assert await workers() == [second.url]

                rejected = await http.post(f"{router.url}/admin/reload")
                assert rejected.status_code == 400
                assert any("health.interval_s" in e for e in rejected.json()["errors"])
                assert (await notify.next_with("RELOADING"))["RELOADING"] == "1"
                await notify.next_with("READY")
                assert await workers() == [second.url]
                served = len(statuses)
                await wait_until(lambda: _at_least(statuses, served + 5))
                stop.set()
            assert any("health.interval_s" in line for line in router.output)
            assert statuses and set(statuses) == {200}, set(statuses)
        nursery.cancel_scope.cancel()


async def _at_least(statuses: list[int], count: int) -> bool:
    return len(statuses) >= count


async def test_metrics_parse_and_count_the_requests_sent(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, INSTANT) as router:
        for _ in range(7):
            ok = await http.post(f"{router.url}/v1/images/generations", json=IMAGE)
            assert ok.status_code == 200
        for _ in range(3):
            bad = await http.post(f"{router.url}/v1/images/generations", json={})
            assert bad.status_code == 422
        text = (await http.get(f"{router.url}/metrics")).text
        samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "dsrouter_requests_total":
                    samples[(sample.labels["route"], sample.labels["status"])] = sample.value
        assert samples[("/v1/images/generations", "200")] == 7
        assert samples[("/v1/images/generations", "422")] == 3


async def test_a_separate_metrics_port_serves_metrics_only(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    port = free_port()
    config = (
        f'[server]\nmetrics_port = {port}\n[security]\nadmin_token = "t0ken"\n'
        "protect_metrics = true\n"
    )
    async with router_process([], config=config, tmp_path=tmp_path) as router:
        assert any(
            f"dsrouter metrics on http://127.0.0.1:{port}/metrics" in line for line in router.output
        )
        scrape = f"http://127.0.0.1:{port}/metrics"
        assert (await http.get(scrape)).status_code == 401
        allowed = await http.get(scrape, headers={"authorization": "Bearer t0ken"})
        assert allowed.status_code == 200
        names = {f.name for f in text_string_to_metric_families(allowed.text)}
        assert "dsrouter_in_flight" in names
        other = await http.get(
            f"http://127.0.0.1:{port}/workers", headers={"authorization": "Bearer t0ken"}
        )
        assert other.status_code == 404
        assert (await http.get(f"{router.url}/health")).status_code == 503


async def test_every_request_gets_a_request_id_a_json_access_line_and_a_count(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = '[security]\nadmin_token = "adm1n"\napi_keys = ["k3y"]\n[logging]\nformat = "json"\n'
    admin = {"authorization": "Bearer adm1n"}
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *INSTANT)
        async with router_process(
            ["--worker-urls", worker.url], config=config, tmp_path=tmp_path
        ) as router:

            async def pool_healthy() -> bool:
                return (await http.get(f"{router.url}/health")).status_code == 200

            await wait_until(pool_healthy)
            served = await http.post(
                f"{router.url}/v1/images/generations",
                json=IMAGE,
                headers={"authorization": "Bearer k3y"},
            )
            refused = await http.post(f"{router.url}/v1/images/generations", json=IMAGE)
            listed = await http.get(
                f"{router.url}/workers", headers={**admin, "x-request-id": "mine-1"}
            )
            assert (served.status_code, refused.status_code, listed.status_code) == (200, 401, 200)
            assert listed.headers["x-request-id"] == "mine-1"
            assert served.headers["x-request-id"] and refused.headers["x-request-id"]
            assert served.headers["x-request-id"] != refused.headers["x-request-id"]

            def access_lines() -> list[dict]:
                entries = []
                for line in router.output:
                    if line.startswith("{") and '"logger": "dsrouter.access"' in line:
                        entries.append(json.loads(line))
                return entries

            async def three_logged() -> bool:
                return len(access_lines()) >= 3

            await wait_until(three_logged)
            by_id = {entry["request_id"]: entry for entry in access_lines()}
            line = by_id[served.headers["x-request-id"]]
            assert line["route"] == "/v1/images/generations" and line["status"] == 200
            assert line["worker"] == worker.url.split("://", 1)[1] and line["attempts"] == 1
            assert line["bytes_in"] > 0 and line["bytes_out"] == len(served.content)
            assert line["latency_ms"] >= line["ttfb_ms"] >= 0
            assert by_id[refused.headers["x-request-id"]]["status"] == 401
            assert by_id["mine-1"]["route"] == "/workers"
            assert not any(entry["path"] == "/health" for entry in access_lines())
            assert not any("adm1n" in text or "k3y" in text for text in router.output)

            text = (await http.get(f"{router.url}/metrics", headers=admin)).text
            counts = {
                (s.labels["route"], s.labels["status"]): s.value
                for family in text_string_to_metric_families(text)
                for s in family.samples
                if s.name == "dsrouter_requests_total"
            }
            assert counts[("/v1/images/generations", "200")] == 1
            assert counts[("/v1/images/generations", "401")] == 1
            assert counts[("/workers", "200")] == 1
        nursery.cancel_scope.cancel()
