"""`security.worker_api_key` reaches workers on every path the router talks to them.

The workers here sit behind an authenticating proxy (simulated: `--require-api-key`), so
any request of the router's that went without the key would get 401: a probe would mark
the worker dead, discovery and job lists would come back empty, the launcher would never
see its workers ready.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import trio

from tests.launcher.helpers import SIM_WORKER, launcher_settings
from tests.support import healthy, router_process, start_simworker

KEY = "pool-behind-a-proxy"
CONFIG = f'[security]\nworker_api_key = "{KEY}"\n[health]\ninterval_s = 0.25\n'
SIM = ("--task-type", "T2I,T2V", "--sec-per-mpx-step", "0", "--require-api-key", KEY)


async def test_probes_discovery_job_lists_and_owner_lookups_carry_the_key(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            workers = [await start_simworker(nursery, *SIM) for _ in range(2)]
            urls = [worker.url for worker in workers]
            assert (await http.get(f"{urls[0]}/health")).status_code == 401
            async with router_process(
                ["--worker-urls", *urls], config=CONFIG, tmp_path=tmp_path
            ) as router:
                await healthy(http, router.url, 2)  # probes and capability probes
                listed = (await http.get(f"{router.url}/workers")).json()["workers"]
                assert all(w["video_support"] is True for w in listed)
                models = await http.get(f"{router.url}/v1/models")
                assert models.status_code == 200 and models.json()["data"]
                created = await http.post(
                    f"{router.url}/v1/videos", json={"prompt": "a wave", "size": "64x64"}
                )
                assert created.status_code == 200, created.text
                # A job the router never saw (made on a worker directly): found by asking.
                direct = await http.post(
                    f"{urls[1]}/v1/videos",
                    json={"prompt": "a cat", "size": "64x64"},
                    headers={"authorization": f"Bearer {KEY}"},
                )
                unknown = direct.json()["id"]
                found = await http.get(f"{router.url}/v1/videos/{unknown}")
                assert found.status_code == 200 and found.json()["id"] == unknown
                page = (await http.get(f"{router.url}/v1/videos", params={"limit": 10})).json()
                ids = {job["id"] for job in page["data"]}
                assert {created.json()["id"], unknown} <= ids
                loras = (await http.get(f"{router.url}/v1/list_loras")).json()
                assert [r["status_code"] for r in loras["results"]] == [200, 200], loras
            nursery.cancel_scope.cancel()


async def test_the_launcher_sees_its_workers_ready_through_the_key(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    settings = launcher_settings(
        2, SIM_WORKER, extra_args=["--sec-per-mpx-step", "0", "--require-api-key", KEY]
    )
    body = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    config = f"{CONFIG}[launcher]\n{body}\n"
    env = {"DSROUTER_RUNTIME_DIR": str(tmp_path / "run")}
    with trio.fail_after(60):
        async with router_process([], config=config, tmp_path=tmp_path, env=env) as router:
            await healthy(http, router.url, 2)
            made = await http.post(
                f"{router.url}/v1/images/generations", json={"prompt": "x", "size": "64x64"}
            )
            assert made.status_code == 200, made.text
