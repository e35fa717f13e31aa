"""Tenants through a real router over simulated workers (issue 20): a tenant over a limit
gets 429 with Retry-After and the limit's name; a higher class jumps the router queue."""

from pathlib import Path

import httpx
import trio

from tests.integration.test_proxy import start_pool
from tests.support import healthy, router_process, start_simworker, wait_until

ADMIN = {"authorization": "Bearer root"}
SMALL = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 1}

LIMITS = """
[health]
interval_s = 0.3
timeout_s = 2.0
[security]
admin_token = "root"
api_keys = ["plain"]
[[security.keys]]
tenant = "rate"
key = "k-rate"
requests_per_s = 0.1
burst = 2
[[security.keys]]
tenant = "gpu"
key = "k-gpu"
cost_per_minute = 60.0
"""


def key(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {name}"}


async def test_over_a_limit_is_429_with_retry_after_from_the_bucket(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        workers = await start_pool(nursery, ("--task-type", "T2I"))
        async with router_process(
            ["--worker-urls", workers[0].url], config=LIMITS, tmp_path=tmp_path
        ) as router:
            http.headers.update(ADMIN)
            await healthy(http, router.url, 1)
            generate = f"{router.url}/v1/images/generations"
            for _ in range(2):
                answer = await http.post(generate, json=SMALL, headers=key("k-rate"))
                assert answer.status_code == 200
            refused = await http.post(generate, json=SMALL, headers=key("k-rate"))
            assert refused.status_code == 429
            assert refused.json()["limit"] == "requests_per_s"
            assert refused.json()["tenant"] == "rate"
            assert 1 <= int(refused.headers["retry-after"]) <= 10  # 1 token at 0.1/s
            # A reload keeps the buckets: the tenant is still out of requests.
            (tmp_path / "router.toml").write_text(LIMITS.replace("burst = 2", "burst = 3"))
            assert (await http.post(f"{router.url}/admin/reload")).status_code == 200
            refused = await http.post(generate, json=SMALL, headers=key("k-rate"))
            assert refused.status_code == 429

            big = {"prompt": "a fox", "size": "1000x1000", "num_inference_steps": 50}
            assert (await http.post(generate, json=big, headers=key("k-gpu"))).status_code == 200
            refused = await http.post(generate, json=big, headers=key("k-gpu"))
            assert refused.status_code == 429
            assert refused.json()["limit"] == "cost_per_minute"
            assert 35 <= int(refused.headers["retry-after"]) <= 40  # 50 units, 10 left, 1/s

            plain = await http.post(generate, json=SMALL, headers=key("plain"))
            assert plain.status_code == 200  # the plain list form: the default tenant
            stranger = await http.post(generate, json=SMALL, headers=key("nope"))
            assert stranger.status_code == 401

            metrics = (await http.get(f"{router.url}/metrics")).text
            for line in (
                'dsrouter_tenant_requests_total{tenant="rate"} 2.0',
                'dsrouter_tenant_over_limit_total{limit="requests_per_s",tenant="rate"} 2.0',
                'dsrouter_tenant_over_limit_total{limit="cost_per_minute",tenant="gpu"} 1.0',
                'dsrouter_tenant_cost_units_total{tenant="gpu"} 50.0',
                'dsrouter_tenant_queue_wait_seconds_count{tenant="default"} 1.0',
            ):
                assert line in metrics, line
        nursery.cancel_scope.cancel()


CLASSES = """
[health]
interval_s = 0.3
timeout_s = 2.0
[routing]
max_inflight_per_worker = 1
[security]
admin_token = "root"
[[security.keys]]
tenant = "batch"
key = "k-bulk"
priority_class = "bulk"
[[security.keys]]
tenant = "web"
key = "k-web"
priority_class = "interactive"
"""


async def test_interactive_request_jumps_a_queue_of_bulk_ones(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    first = {"prompt": "a fox", "size": "1024x1024", "num_inference_steps": 10}  # 3 s
    job = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 50}  # 0.06 s
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, "--sec-per-mpx-step", "0.3")
        async with router_process(
            ["--worker-urls", worker.url], config=CLASSES, tmp_path=tmp_path
        ) as router:
            http.headers.update(ADMIN)
            await healthy(http, router.url, 1)
            finished: list[str] = []

            async def generate(
                name: str, api_key: str, priority: str | None = None, body: dict = job
            ) -> None:
                headers = key(api_key)
                if priority is not None:
                    headers["x-dsrouter-priority"] = priority
                answer = await http.post(
                    f"{router.url}/v1/images/generations", json=body, headers=headers
                )
                assert answer.status_code == 200
                finished.append(name)

            async def queued(count: int) -> None:
                async def check() -> bool:
                    return (await http.get(f"{router.url}/workers")).json()["queued"] == count

                await wait_until(check)

            with trio.fail_after(30):
                async with trio.open_nursery() as clients:
                    clients.start_soon(generate, "bulk-running", "k-bulk", None, first)
                    await wait_until(lambda: _in_flight(http, router.url))
                    for i in range(3):
                        clients.start_soon(generate, f"bulk{i}", "k-bulk")
                        await queued(i + 1)
                    # The header lowers a class, never raises one: this one stays bulk.
                    clients.start_soon(generate, "bulk-asking-system", "k-bulk", "system")
                    await queued(4)
                    clients.start_soon(generate, "web", "k-web")
                    await queued(5)
                    tenants = (await http.get(f"{router.url}/workers")).json()
                    assert tenants["queued_by_tenant"] == {"batch": 4, "web": 1}
                    public = (await http.get(f"{router.url}/health", headers={})).text
                    assert "batch" not in public  # tenant names are for operators
            assert finished == [
                "bulk-running",
                "web",
                "bulk0",
                "bulk1",
                "bulk2",
                "bulk-asking-system",
            ]
        nursery.cancel_scope.cancel()


async def _in_flight(http: httpx.AsyncClient, router: str) -> bool:
    workers = (await http.get(f"{router}/workers")).json()["workers"]
    return sum(w["active_requests"] for w in workers) == 1
