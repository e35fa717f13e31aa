"""`dsrouter.client` and the operator CLI against real routers and simulated workers."""

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio

from dsrouter.client import (
    AsyncClient,
    Client,
    HTTPStatusError,
    PoolAsleepError,
    RefitError,
    RouterUnreachableError,
)
from tests.support import (
    RouterProcess,
    SimWorker,
    free_port,
    router_process,
    start_simworker,
    wait_until,
)

CONFIG = """
[health]
interval_s = 0.2
timeout_s = 1.0
failure_threshold = 2
recovery_threshold = 2
"""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@asynccontextmanager
async def pool(
    tmp_path: Path,
    nursery: trio.Nursery,
    config: str = CONFIG,
    count: int = 2,
    env: dict[str, str] | None = None,
) -> AsyncIterator[tuple[RouterProcess, list[SimWorker]]]:
    """A router with `count` simulated workers, all routable when this yields."""
    workers = [await start_simworker(nursery, "--sec-per-mpx-step", "0") for _ in range(count)]
    async with router_process(
        ["--worker-urls", *(w.url for w in workers)], config=config, tmp_path=tmp_path, env=env
    ) as router:
        async with httpx.AsyncClient(trust_env=False) as http:

            async def all_routable() -> bool:
                health = (await http.get(f"{router.url}/health")).json()
                return health["healthy_workers"] == count

            await wait_until(all_routable)
        yield router, workers


async def ctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run `python -m dsrouter ARGS` with no DSROUTER_* variables inherited."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DSROUTER_")}
    return await trio.run_process(
        [sys.executable, "-m", "dsrouter", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env={**clean, **(env or {})},
    )


def _rows(stdout: bytes) -> dict[str, list[str]]:
    """Status table rows by worker URL."""
    return {
        line.split()[0]: line.split()
        for line in stdout.decode().splitlines()
        if line.startswith("http://")
    }


async def _set_fault(worker: SimWorker, **faults: object) -> None:
    async with httpx.AsyncClient(trust_env=False) as http:
        response = await http.post(f"{worker.url}/_sim/faults", json=faults)
        assert response.status_code == 200, response.text


async def test_blocking_client_generates_images_and_decodes_rollouts(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        async with pool(tmp_path, nursery) as (router, workers):

            def use_blocking_client() -> tuple:
                with Client(router.url, admin_token="", api_key="") as client:
                    image = client.generate_images(
                        "a red fox", size="32x32", n=2, output_format="png"
                    )
                    samples = client.rollout(
                        "a red fox",
                        seed=7,
                        width=64,
                        height=64,
                        num_outputs_per_prompt=2,
                        rollout_return_denoising_env=True,
                    )
                    return image, samples

            image, samples = await trio.to_thread.run_sync(use_blocking_client)
            assert len(image.images) == 2 and image.urls == []
            assert all(data.startswith(PNG_SIGNATURE) for data in image.images)
            assert image.id
            assert image.worker in {f"127.0.0.1:{w.port}" for w in workers}

            assert [s["seed"] for s in samples] == [7, 7]
            assert all(s["prompt"] == "a red fox" for s in samples)
            output = samples[0]["generated_output"]
            assert output["__tensor__"] is True and output["shape"] == [3, 64, 64]
            assert isinstance(output["data"], bytes) and len(output["data"]) > 3 * 64 * 64 * 4
            assert samples[0]["denoising_env"]["guidance"]["__tensor__"] is True

            async with AsyncClient(router.url, admin_token="", api_key="") as client:
                by_url = await client.generate_images("a cat", size="16x16", response_format="url")
                assert by_url.images == [] and len(by_url.urls) == 1
                with pytest.raises(HTTPStatusError) as bad:
                    await client.generate_images("a cat", size="big")
                assert bad.value.status == 400 and bad.value.message
        nursery.cancel_scope.cancel()


async def test_refit_reports_the_pool_version_and_names_workers_that_fail(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        async with pool(tmp_path, nursery) as (router, (first, second)):
            async with AsyncClient(router.url, admin_token="") as client:
                result = await client.refit("ckpt/step-1", version="step-1")
                assert result.success and result.version == "step-1"
                assert result.stale_workers == [] and result.failed == {}
                assert sorted(r.worker_url for r in result.results) == sorted(
                    [first.url, second.url]
                )
                assert {w.weight_version for w in await client.workers()} == {"step-1"}

                await _set_fault(second, refit_fails=True)
                with pytest.raises(RefitError) as failed:
                    await client.refit("ckpt/step-2", version="step-2")
                assert list(failed.value.failed) == [second.url]
                assert "no such checkpoint" in failed.value.failed[second.url]
                assert second.url in str(failed.value) and first.url not in str(failed.value)
                assert failed.value.result.version == "step-2"
                assert failed.value.result.stale_workers == [second.url]
                # A failed load may leave anything behind: the router forgets its version.
                states = {w.url: (w.state, w.weight_version) for w in await client.workers()}
                assert states == {first.url: ("healthy", "step-2"), second.url: ("stale", None)}

            # Through the CLI: a checkpoint no worker can load fails everywhere, exit 1,
            # each worker named, and the pool keeps the weights it had.
            done = await ctl("refit", "ckpt/missing-3", "--version", "step-3", "--url", router.url)
            assert done.returncode == 1, done.stderr
            err = done.stderr.decode()
            assert first.url in err and second.url in err
            assert "pool version step-2" in err and "Traceback" not in err

            await _set_fault(second, refit_fails=False)
            done = await ctl(
                "refit",
                "ckpt/step-4",
                "--version",
                "step-4",
                "--mode",
                "immediate",
                "--url",
                router.url,
            )
            assert done.returncode == 0, done.stderr
            assert "pool on version step-4 (2/2" in done.stdout.decode()
        nursery.cancel_scope.cancel()


async def test_a_sleeping_pool_refuses_generations_until_woken(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        async with pool(tmp_path, nursery) as (router, workers):
            async with AsyncClient(router.url, admin_token="", api_key="") as client:
                slept = await client.sleep()
                assert slept.ok and len(slept.results) == 2
                health = await client.health()
                assert not health.healthy and health.sleeping_workers == 2
                with pytest.raises(PoolAsleepError) as asleep:
                    await client.generate_images("a cat", size="16x16")
                assert asleep.value.status == 503 and "asleep" in asleep.value.message
                with pytest.raises(PoolAsleepError):
                    await client.rollout("a cat", seed=1)

                woken = await client.wake()
                assert woken.ok and {r.worker_url for r in woken.results} == {
                    w.url for w in workers
                }
                image = await client.generate_images("a cat", size="16x16")
                assert len(image.images) == 1

            # The CLI twins say what happened to each worker.
            done = await ctl("sleep", "--url", router.url)
            assert done.returncode == 0, done.stderr
            assert sorted(done.stdout.decode().splitlines()) == sorted(
                f"{w.url}: asleep" for w in workers
            )
            status = await ctl("status", "--url", router.url)
            assert status.stdout.decode().splitlines()[0].endswith(", asleep")
            done = await ctl("wake", "--url", router.url)
            assert done.returncode == 0 and done.stdout.decode().count(": awake") == 2
        nursery.cancel_scope.cancel()


async def test_status_lists_every_worker_and_drain_shows_in_it(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        async with pool(tmp_path, nursery) as (router, (first, second)):
            status = await ctl("status", env={"DSROUTER_URL": router.url})
            assert status.returncode == 0, status.stderr
            header = status.stdout.decode().splitlines()[0]
            assert header.startswith(f"router {router.url}: healthy, 2/2 workers routable")
            rows = _rows(status.stdout)
            assert set(rows) == {first.url, second.url}
            assert all(row[1] == "healthy" for row in rows.values())

            drained = await ctl("workers", "drain", first.url, "--url", router.url)
            assert drained.returncode == 0, drained.stderr
            assert f"{first.url}: draining" in drained.stdout.decode()
            rows = _rows((await ctl("status", "--url", router.url)).stdout)
            assert (rows[first.url][1], rows[second.url][1]) == ("draining", "healthy")

            async with AsyncClient(router.url, admin_token="") as client:
                for _ in range(4):
                    image = await client.generate_images("x", size="16x16")
                    assert image.worker == f"127.0.0.1:{second.port}"

            undrained = await ctl("workers", "undrain", first.url + "/", "--url", router.url)
            assert undrained.returncode == 0, undrained.stderr
            rows = _rows((await ctl("status", "--url", router.url)).stdout)
            assert rows[first.url][1] == "healthy"

            removed = await ctl("workers", "remove", second.url, "--url", router.url)
            assert removed.returncode == 0, removed.stderr
            assert set(_rows((await ctl("status", "--url", router.url)).stdout)) == {first.url}
            again = await ctl("workers", "remove", second.url, "--url", router.url)
            assert again.returncode == 1
            assert "404" in again.stderr.decode() and len(again.stderr.splitlines()) == 1

            added = await ctl("workers", "add", second.url, "--url", router.url)
            assert added.returncode == 0, added.stderr
            assert set(_rows((await ctl("status", "--url", router.url)).stdout)) == {
                first.url,
                second.url,
            }
        nursery.cancel_scope.cancel()


async def test_admin_token_and_api_key_go_to_the_routes_that_need_them(tmp_path: Path) -> None:
    config = CONFIG + '\n[security]\nadmin_token = "admin-secret"\napi_keys = ["key-1"]\n'
    async with trio.open_nursery() as nursery:
        async with pool(tmp_path, nursery, config=config, count=1) as (router, (worker,)):
            async with AsyncClient(
                router.url, admin_token="admin-secret", api_key="key-1"
            ) as client:
                assert [w.url for w in await client.workers()] == [worker.url]
                assert len((await client.generate_images("x", size="16x16")).images) == 1
            async with AsyncClient(router.url, admin_token="wrong", api_key="key-1") as client:
                with pytest.raises(HTTPStatusError) as denied:
                    await client.workers()
                assert denied.value.status == 401
                assert len((await client.generate_images("x", size="16x16")).images) == 1

            denied_ctl = await ctl("status", "--url", router.url)
            assert denied_ctl.returncode == 2
            assert "401" in denied_ctl.stderr.decode()
            allowed = await ctl(
                "status", "--url", router.url, env={"DSROUTER_ADMIN_TOKEN": "admin-secret"}
            )
            assert allowed.returncode == 0 and worker.url in allowed.stdout.decode()
            custom = await ctl(
                "status",
                "--url",
                router.url,
                "--token-env",
                "MY_TOKEN",
                env={"MY_TOKEN": "admin-secret"},
            )
            assert custom.returncode == 0, custom.stderr
        nursery.cancel_scope.cancel()


async def test_unreachable_router_exits_2_with_one_line() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["refit", "ckpt/x"], ["workers", "drain", "http://h:1"]):
        done = await ctl(*args, "--url", url)
        assert done.returncode == 2, args
        lines = done.stderr.decode().strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"dsrouter {args[0]}: cannot reach the router at {url}")
        assert done.stdout == b""
    async with AsyncClient(url, timeout=5) as client:
        with pytest.raises(RouterUnreachableError):
            await client.health()
