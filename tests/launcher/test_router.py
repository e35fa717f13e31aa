"""Managed workers through a real router process (`dsrouter run` with `[launcher]`).

Workers are simulated (`python -m dsrouter.simworker`); every pid is read from `/workers`
and checked gone through /proc at the end. Each test bounds itself with `trio.fail_after`.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.launcher.helpers import (
    FAKE_WORKER,
    SIM_WORKER,
    alive,
    free_port_block,
    launcher_settings,
    wait_dead,
)
from tests.support import Traffic, router_process, wait_until

TEST_TIMEOUT_S = 45.0
SEED_004_YAML = """\
launcher:
  backend: local
  model: Qwen/Qwen-Image
  num_workers: 8
  num_gpus_per_worker: 1
  worker_base_port: 10090
  wait_timeout: 600
"""


def _router_toml(num_workers: int, command: list[str] = SIM_WORKER, **launcher: Any) -> str:
    """A router.toml whose [launcher] runs `command` on a block of free ports."""
    settings = launcher_settings(num_workers, command, **launcher)
    body = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    return f"[health]\ninterval_s = 0.5\n\n[launcher]\n{body}\n"


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"DSROUTER_RUNTIME_DIR": str(tmp_path / "run"), **extra}


async def _managed(http: httpx.AsyncClient, router: str) -> dict[int, dict[str, Any]]:
    """index -> worker object, for the managed workers registered now."""
    workers = (await http.get(f"{router}/workers")).json()["workers"]
    return {w["supervisor"]["index"]: w for w in workers if w["managed"]}


CUBE = {"prompt": "a red cube", "size": "64x64"}


async def test_three_workers_serve_and_a_killed_one_is_restarted_while_the_rest_serve(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with router_process(
            [], config=_router_toml(3), tmp_path=tmp_path, env=_env(tmp_path)
        ) as router:
            managed = await _managed(http, router.url)
            assert sorted(managed) == [0, 1, 2]
            assert all(
                w["supervisor"]["state"] == "ready"
                and w["supervisor"]["restarts"] == 0
                and not w["is_dead"]
                for w in managed.values()
            )
            pids = [w["supervisor"]["pid"] for w in managed.values()]
            victim = managed[1]["supervisor"]["pid"]
            traffic = Traffic("/v1/images/generations", CUBE)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(traffic.client, http, router.url)
                await wait_until(lambda: _served(traffic, 3))
                before = len(traffic.statuses)
                os.kill(victim, signal.SIGKILL)

                async def restarted() -> bool:
                    now = await _managed(http, router.url)
                    assert {0, 2} <= set(now), "the other workers stay registered"
                    return 1 in now and now[1]["supervisor"]["pid"] != victim

                await wait_until(restarted, timeout_s=20)
                during = traffic.statuses[before:]
                target = traffic.statuses.count(200) + 3
                await wait_until(lambda: _served(traffic, target))
                traffic.stop()
            assert len(during) >= 1 and during.count(200) >= len(during) - 1, during
            supervisor = (await _managed(http, router.url))[1]["supervisor"]
            assert supervisor["restarts"] == 1 and supervisor["state"] == "ready"
            assert supervisor["last_exit"] == "killed by SIGKILL"
            await wait_dead([victim])
            pids.append(supervisor["pid"])
            assert any(
                "worker 1: ready -> backoff (killed by SIGKILL" in line for line in router.output
            )
        await wait_dead(pids, timeout_s=2)


async def _served(traffic: Traffic, count: int) -> bool:
    return traffic.statuses.count(200) >= count


async def _models(http: httpx.AsyncClient, router: str) -> list[str]:
    answer = await http.get(f"{router}/v1/models")
    return sorted(card["id"] for card in answer.json().get("data", []))


async def test_sighup_with_new_extra_args_restarts_workers_one_by_one_without_failing_requests(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = _router_toml(2, stop_timeout_s=2.0)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with router_process(
            [], config=config, tmp_path=tmp_path, env=_env(tmp_path)
        ) as router:
            old = {i: w["supervisor"]["pid"] for i, w in (await _managed(http, router.url)).items()}
            assert sorted(old) == [0, 1]
            assert await _models(http, router.url) == ["sim/Wan-Sim-T2V"]
            traffic = Traffic("/v1/images/generations", CUBE)
            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(traffic.client, http, router.url)
                await wait_until(lambda: _served(traffic, 5))
                (tmp_path / "router.toml").write_text(
                    config.replace(
                        "[launcher]\n",
                        '[launcher]\nextra_args = ["--served-model-name", "rolled"]\n',
                    )
                )
                os.kill(router.pid, signal.SIGHUP)

                async def rolled() -> bool:
                    now = await _managed(http, router.url)
                    return (
                        sorted(now) == [0, 1]
                        and all(
                            w["supervisor"]["pid"] not in old.values() and w["state"] == "healthy"
                            for w in now.values()
                        )
                        and await _models(http, router.url) == ["rolled"]
                    )

                await wait_until(rolled, timeout_s=30)
                target = traffic.statuses.count(200) + 5
                await wait_until(lambda: _served(traffic, target))
                traffic.stop()
            assert set(traffic.statuses) == {200}, traffic.statuses
            await wait_dead(old.values(), timeout_s=2)
            log = "\n".join(router.output)
            assert "reload: rolling restart of worker(s) [0, 1]" in log
            assert "rolling restart done" in log
            # one worker at a time: worker 1 drained only after worker 0 was back
            assert (
                log.index("restarting worker 0")
                < log.index("worker 0 is back")
                < log.index("draining worker 1")
            )
            managed = await _managed(http, router.url)
            assert all(w["supervisor"]["restarts"] == 0 for w in managed.values())
            assert all(
                w["supervisor"]["last_exit"].startswith("stopped for a rolling restart")
                for w in managed.values()
            )

            again = await http.post(f"{router.url}/admin/reload")
            assert again.status_code == 200
            assert again.json()["rolling_restart"] == []
            pids = [w["supervisor"]["pid"] for w in managed.values()]
        await wait_dead(pids, timeout_s=2)


async def test_a_new_model_on_reload_after_a_refit_starts_a_new_weight_lineage(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """The restarted workers serve the new model, not the old model's refit loaded back
    onto them by a catch-up."""
    config = _router_toml(2, stop_timeout_s=2.0)
    with trio.fail_after(TEST_TIMEOUT_S):
        async with router_process(
            [], config=config, tmp_path=tmp_path, env=_env(tmp_path)
        ) as router:
            old = {i: w["supervisor"]["pid"] for i, w in (await _managed(http, router.url)).items()}
            refit = await http.post(
                f"{router.url}/update_weights_from_disk",
                json={"model_path": "sim/step-1", "weight_version": "v1"},
            )
            assert refit.status_code == 200 and refit.json()["success"] is True
            (tmp_path / "router.toml").write_text(
                config.replace('model = "sim/Wan-Sim-T2V"', 'model = "sim/Other-T2V"')
            )
            reloaded = await http.post(f"{router.url}/admin/reload")
            assert reloaded.status_code == 200 and reloaded.json()["rolling_restart"] == [0, 1]

            async def rolled() -> bool:
                now = await _managed(http, router.url)
                return sorted(now) == [0, 1] and all(
                    w["supervisor"]["pid"] not in old.values() and w["state"] == "healthy"
                    for w in now.values()
                )

            await wait_until(rolled, timeout_s=30)
            listed = (await http.get(f"{router.url}/workers")).json()
            assert listed["target_version"] is None
            assert all(not w["is_stale"] for w in listed["workers"])
            for _ in range(6):
                answer = await http.post(f"{router.url}/v1/images/generations", json=CUBE)
                assert answer.status_code == 200
                assert answer.headers["x-simworker-model-path"] == "sim/Other-T2V"
            pids = [w["supervisor"]["pid"] for w in (await _managed(http, router.url)).values()]
        await wait_dead(pids, timeout_s=2)


async def _slots(http: httpx.AsyncClient, router: str) -> list[dict[str, Any]]:
    """`managed_workers` of `GET /workers`: every launcher slot, registered or not."""
    return (await http.get(f"{router}/workers")).json()["managed_workers"]


async def test_a_worker_out_of_restarts_is_failed_and_the_rest_keep_serving(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    logs = tmp_path / "logs"
    config = _router_toml(2, max_restarts=1, log_dir=str(logs))
    with trio.fail_after(TEST_TIMEOUT_S):
        async with router_process(
            [], config=config, tmp_path=tmp_path, env=_env(tmp_path)
        ) as router:
            managed = await _managed(http, router.url)
            slots = await _slots(http, router.url)
            assert [(s["index"], s["state"], s["registered"]) for s in slots] == [
                (0, "ready", True),
                (1, "ready", True),
            ]
            assert [s["url"] for s in slots] == [managed[0]["url"], managed[1]["url"]]
            assert [s["pid"] for s in slots] == [managed[i]["supervisor"]["pid"] for i in (0, 1)]
            first = slots[0]["pid"]
            os.kill(first, signal.SIGKILL)

            async def back() -> bool:
                now = await _managed(http, router.url)
                return 0 in now and now[0]["supervisor"]["pid"] != first

            await wait_until(back, timeout_s=20)
            second = (await _managed(http, router.url))[0]["supervisor"]["pid"]
            os.kill(second, signal.SIGKILL)

            async def failed() -> bool:
                return (await _slots(http, router.url))[0]["state"] == "failed"

            await wait_until(failed, timeout_s=20)
            # The registry forgot worker 0; /workers still shows its slot, and why it failed.
            answer = (await http.get(f"{router.url}/workers")).json()
            assert [w["supervisor"]["index"] for w in answer["workers"] if w["managed"]] == [1]
            gone, serving = answer["managed_workers"]
            assert gone == gone | {
                "index": 0,
                "url": managed[0]["url"],
                "worker_id": managed[0]["worker_id"],
                "state": "failed",
                "registered": False,
                "pid": None,
                "restarts": 1,
                "last_exit": "killed by SIGKILL",
                "log_file": str(logs / "worker-0.log"),
                "detail": "killed by SIGKILL; 1 restart(s) within 600s already",
            }
            assert serving == serving | {
                "index": 1,
                "state": "ready",
                "registered": True,
                "pid": managed[1]["supervisor"]["pid"],
                "restarts": 0,
            }
            assert any(
                "worker 0: ready -> failed (killed by SIGKILL; 1 restart(s) within 600s "
                "already)" in line
                for line in router.output
            )
            log_text = await trio.Path(gone["log_file"]).read_text()
            assert log_text.count("---- dsrouter ") == 2, "one header per run: start + restart"
            status = await trio.run_process(
                [sys.executable, "-m", "dsrouter", "status", "--url", router.url],
                capture_stdout=True,
            )
            lines = status.stdout.decode().splitlines()
            at = lines.index("launched workers not serving:")
            assert lines[at + 1 :] == [
                f"  worker 0 ({managed[0]['url']}): failed, 1 restart(s), last exit: killed by "
                f"SIGKILL, log {gone['log_file']}",
                "    killed by SIGKILL; 1 restart(s) within 600s already",
            ]
            health = (await http.get(f"{router.url}/health")).json()
            assert health["status"] == "healthy" and health["healthy_workers"] == 1
            for _ in range(3):
                response = await http.post(
                    f"{router.url}/v1/images/generations",
                    json={"prompt": "still serving", "size": "64x64"},
                )
                assert response.status_code == 200
                assert response.headers["x-dsrouter-worker"] == managed[1]["display_id"]
            survivor = serving["pid"]
        await wait_dead([first, second, survivor], timeout_s=2)


async def test_router_sigterm_stops_every_worker(tmp_path: Path, http: httpx.AsyncClient) -> None:
    with trio.fail_after(TEST_TIMEOUT_S):
        async with router_process(
            [], config=_router_toml(2), tmp_path=tmp_path, env=_env(tmp_path)
        ) as router:
            pids = [w["supervisor"]["pid"] for w in (await _managed(http, router.url)).values()]
            assert len(pids) == 2 and all(map(alive, pids))
            assert await router.stop(signal.SIGTERM) == 0
            # stopped (not merely orphaned) before the router exited
            assert not any(map(alive, pids))
            assert sum("-> stopped (stopped by the router" in line for line in router.output) == 2
        assert not list((tmp_path / "run").glob("router-*.json"))


async def test_router_sigkill_leaves_no_worker_and_the_next_start_cleans_up(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """The parent-death signal kills the workers; their own children (here one grandchild
    per worker) are left to the next router, which finds them through the pid file."""
    config = _router_toml(2, command=FAKE_WORKER, extra_args=["--grandchild"])
    with trio.fail_after(TEST_TIMEOUT_S):
        async with router_process(
            [], config=config, tmp_path=tmp_path, env=_env(tmp_path)
        ) as router:
            pids = [w["supervisor"]["pid"] for w in (await _managed(http, router.url)).values()]
            grandchildren = [
                int(m)
                for line in router.output
                for m in re.findall(r"fakeworker grandchild pid (\d+)", line)
            ]
            assert len(pids) == 2 and len(grandchildren) == 2
            assert await router.stop(signal.SIGKILL) == -signal.SIGKILL
        try:
            await wait_dead(pids)
            assert all(map(alive, grandchildren))
            assert len(list((tmp_path / "run").glob("router-*.json"))) == 1
            async with router_process(
                [],
                config=_router_toml(1, command=FAKE_WORKER),
                tmp_path=tmp_path,
                env=_env(tmp_path),
            ) as router:
                await wait_dead(grandchildren, timeout_s=2)
                assert any(
                    "died without stopping its workers: killed 2 leftover process(es)" in line
                    for line in router.output
                )
                assert len(list((tmp_path / "run").glob("router-*.json"))) == 1
        finally:
            for pid in filter(alive, grandchildren):  # only if the test failed
                os.kill(pid, signal.SIGKILL)


async def test_seed_004_launcher_yaml_is_accepted(tmp_path: Path) -> None:
    yaml_path = tmp_path / "local_launcher.yaml"
    yaml_path.write_text(SEED_004_YAML)
    (tmp_path / "router.toml").write_text(f"[launcher]\ncommand = {json.dumps(FAKE_WORKER)}\n")
    gpus = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}
    with trio.fail_after(TEST_TIMEOUT_S):
        checked = await trio.run_process(
            [
                *(sys.executable, "-m", "dsrouter", "check-config"),
                *("--config", str(tmp_path / "router.toml")),
                *("--launcher-config", str(yaml_path)),
            ],
            capture_stdout=True,
            env=gpus,
        )
    launcher = json.loads(checked.stdout)["launcher"]
    assert launcher == launcher | {
        "backend": "local",
        "model": "Qwen/Qwen-Image",
        "num_workers": 8,
        "num_gpus_per_worker": 1,
        "worker_base_port": 10090,
        "wait_timeout_s": 600.0,
    }


async def test_check_config_and_run_reject_a_pool_that_cannot_start_the_same_way(
    tmp_path: Path,
) -> None:
    """On this GPU-less machine, with no sglang on PATH, the seed YAML must fail in both
    commands with the same lines, naming every problem, before serving or starting anything."""
    yaml_path = tmp_path / "local_launcher.yaml"
    yaml_path.write_text(SEED_004_YAML)
    env = {
        **os.environ,
        **_env(tmp_path),
        "CUDA_VISIBLE_DEVICES": "",
        # nothing on PATH, not even this virtualenv's bin (which holds `sglang` when the
        # worker extra is installed)
        "PATH": str(tmp_path),
    }
    outcomes = []
    with trio.fail_after(TEST_TIMEOUT_S):
        for command in (["check-config"], ["run", "--host", "127.0.0.1", "--port", "0"]):
            done = await trio.run_process(
                [sys.executable, "-m", "dsrouter", *command, "--launcher-config", str(yaml_path)],
                capture_stdout=True,
                capture_stderr=True,
                check=False,
                env=env,
            )
            assert done.stdout == b""
            outcomes.append((done.returncode, done.stderr.decode()))
    assert outcomes[0] == outcomes[1]
    code, errors = outcomes[0]
    assert code == 2
    assert "'sglang' not found on PATH" in errors
    assert "not enough GPUs: 8 workers x 1 GPU(s) each need 8, found 0" in errors
    assert all(line.startswith("config error: ") for line in errors.splitlines())


async def test_seed_004_yaml_launches_its_pool_given_gpus_and_a_worker_command(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """The YAML as published, with router.toml supplying the simulated worker command and
    CUDA_VISIBLE_DEVICES pretending there are 8 GPUs: 8 workers, one GPU each."""
    yaml_path = tmp_path / "local_launcher.yaml"
    base = free_port_block(32)
    yaml_path.write_text(SEED_004_YAML.replace("10090", str(base)))
    config = (
        f"[launcher]\ncommand = {json.dumps(FAKE_WORKER)}\n"
        f"master_port_base = {base + 16}\nscheduler_port_base = {base + 24}\n"
        "internal_port_stride = 1\n"
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        async with router_process(
            ["--launcher-config", str(yaml_path)],
            config=config,
            tmp_path=tmp_path,
            env=_env(tmp_path, CUDA_VISIBLE_DEVICES="0,1,2,3,4,5,6,7"),
        ) as router:
            managed = await _managed(http, router.url)
            assert sorted(managed) == list(range(8))
            assert [managed[i]["supervisor"]["gpus"] for i in range(8)] == [
                [str(i)] for i in range(8)
            ]
            assert managed[7]["url"] == f"http://127.0.0.1:{base + 14}"
            pids = [w["supervisor"]["pid"] for w in managed.values()]
        await wait_dead(pids, timeout_s=2)


async def test_demo_runs_simulated_workers_through_the_launcher(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    base = free_port_block(8)
    config = (
        f"[launcher]\nworker_base_port = {base}\nmaster_port_base = {base + 4}\n"
        f"scheduler_port_base = {base + 6}\ninternal_port_stride = 1\n"
    )
    with trio.fail_after(TEST_TIMEOUT_S):
        async with router_process(
            ["--demo", "--demo-workers", "2"], config=config, tmp_path=tmp_path, env=_env(tmp_path)
        ) as router:
            managed = await _managed(http, router.url)
            assert sorted(managed) == [0, 1]
            response = await http.post(
                f"{router.url}/v1/images/generations", json={"prompt": "demo", "size": "64x64"}
            )
            assert response.status_code == 200
            pids = [w["supervisor"]["pid"] for w in managed.values()]
        await wait_dead(pids, timeout_s=2)
