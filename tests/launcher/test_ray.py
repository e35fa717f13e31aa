"""The Ray backend through a real router process on a real local Ray cluster.

One cluster for the module: two logical nodes with two simulated GPUs each (`raycluster.py`,
in its own process; the node-loss test adds and removes more). Each test runs its routers in
a namespace of its own and checks at the end that no process of its workers, actors or
keepers is left and that the namespace holds no actor or placement group. Everything Ray
writes goes under one temporary directory (`HOME`, `RAY_TMPDIR`), with token authentication
off.

Without Ray installed the tests skip, unless `DSROUTER_REQUIRE_RAY=1` (CI) makes that a
failure.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from dsrouter.config import LauncherConfig
from dsrouter.launcher import RayPool
from dsrouter.launcher.progress import Progress
from tests.launcher.helpers import SIM_WORKER, alive, wait_dead
from tests.support import RouterProcess, Traffic, router_process, wait_until

REQUIRE_VAR = "DSROUTER_REQUIRE_RAY"
CLUSTER_START_S = 120.0
ROUTER_START_S = 120.0
"""Four actors (a Python process each) and their workers start on 2 shared cores."""
TEST_TIMEOUT_S = 240.0
LEFTOVERS = [sys.executable, "-m", "tests.launcher.raycluster", "--leftovers"]
CUBE = {"prompt": "a red cube", "size": "64x64"}


def require_ray() -> None:
    """Skip without Ray; fail instead under CI's flag."""
    if importlib.util.find_spec("ray") is not None:
        return
    reason = "ray is not installed (pip install -e '.[ray]')"
    if os.environ.get(REQUIRE_VAR) == "1":
        pytest.fail(f"{REQUIRE_VAR}=1 but {reason}")
    pytest.skip(reason)


@attrs.frozen
class RayCluster:
    address: str
    env: dict[str, str]
    """What every process that talks to the cluster gets: where Ray writes, auth off."""
    process: subprocess.Popen[str]

    def command(self, line: str) -> str:
        """One command to `raycluster.py` (`add`, `remove NODE_ID`); its one-line answer."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.process.stdout.readline().strip()

    def leftovers(self, namespace: str) -> dict[str, list[str]]:
        """The named actors and placement groups `namespace` still has on the cluster."""
        out = subprocess.run(
            [*LEFTOVERS, self.address, namespace],
            env={**os.environ, **self.env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[RayCluster]:
    require_ray()
    scratch = Path(tempfile.mkdtemp(prefix="dsr-ray-"))  # short: Ray's socket paths are long
    (scratch / "home").mkdir()
    env = {
        "HOME": str(scratch / "home"),
        "RAY_TMPDIR": str(scratch),
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.launcher.raycluster", "2", "2", "2"],
        env={**os.environ, **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        if not select.select([process.stdout], [], [], CLUSTER_START_S)[0]:
            raise AssertionError(f"no Ray cluster within {CLUSTER_START_S}s")
        address = process.stdout.readline().strip()
        assert address, f"the Ray cluster did not start (exit status {process.poll()})"
        yield RayCluster(address, env, process)
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        process.stdout.close()
        shutil.rmtree(scratch, ignore_errors=True)


def _router_toml(
    cluster: RayCluster, namespace: str, workers: int, detach: bool, **changes: object
) -> str:
    launcher = {
        "backend": "ray",
        "model": "sim/Wan-Sim-T2V",
        "num_workers": workers,
        "num_gpus_per_worker": 1,
        "command": SIM_WORKER,
        "backoff_initial_s": 0.1,
        "backoff_max_s": 0.5,
        "wait_timeout_s": 90.0,
        "stop_timeout_s": 5.0,
        **changes,
    }
    body = "\n".join(f"{key} = {json.dumps(value)}" for key, value in launcher.items())
    ray = {"address": cluster.address, "namespace": namespace}
    table = ", ".join(f"{key} = {json.dumps(value)}" for key, value in ray.items())
    return (
        f"[health]\ninterval_s = 0.5\n\n[launcher]\n{body}\n"
        f"ray = {{ {table}, detach = {str(detach).lower()} }}\n"
    )


def _router(
    cluster: RayCluster,
    tmp_path: Path,
    namespace: str,
    workers: int,
    detach: bool,
    **changes: object,
) -> AbstractAsyncContextManager[RouterProcess]:
    config_dir = tmp_path / namespace
    config_dir.mkdir(exist_ok=True)
    return router_process(
        [],
        config=_router_toml(cluster, namespace, workers, detach, **changes),
        tmp_path=config_dir,
        env={**cluster.env, "DSROUTER_RUNTIME_DIR": str(tmp_path / "run")},
        start_timeout_s=ROUTER_START_S,
    )


async def _slots(http: httpx.AsyncClient, router: str) -> list[dict[str, Any]]:
    return (await http.get(f"{router}/workers")).json()["managed_workers"]


def _pids(slots: list[dict[str, Any]]) -> list[int]:
    """Every process the slots show: servers, actors, and the keepers between them."""
    return [
        pid
        for slot in slots
        for pid in (slot["pid"], slot["keeper_pid"], slot["actor_pid"])
        if pid is not None
    ]


async def _stopped_and_clean(
    router: RouterProcess, cluster: RayCluster, namespace: str, pids: list[int]
) -> None:
    assert await router.stop() == 0
    await wait_dead(pids, timeout_s=30.0)
    left = await trio.to_thread.run_sync(cluster.leftovers, namespace)
    assert left == {"actors": [], "placement_groups": []}


async def test_four_workers_on_two_nodes_serve_survive_an_actor_kill_and_leave_nothing(
    ray_cluster: RayCluster, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    namespace = "pool4"
    logs = tmp_path / "logs"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _router(
            ray_cluster, tmp_path, namespace, 4, detach=False, log_dir=str(logs)
        ) as router:
            slots = await _slots(http, router.url)
            assert [slot["state"] for slot in slots] == ["ready"] * 4
            for slot in slots:  # written by each actor on its node (all on this machine)
                assert slot["log_file"] == str(logs / f"worker-{slot['index']}.log")
                text = await trio.Path(slot["log_file"]).read_text()
                assert f"simworker listening on {slot['url']}" in text
            # One GPU bundle each: two slots per logical node, never one GPU twice.
            nodes = [slot["node_id"] for slot in slots]
            assert sorted(nodes.count(node) for node in set(nodes)) == [2, 2]
            assert len({(slot["node_id"], *slot["gpus"]) for slot in slots}) == 4
            # Registered with the node's address, not loopback.
            for slot in slots:
                assert slot["registered"] and slot["url"].startswith(f"http://{slot['node']}:")
            workers = (await http.get(f"{router.url}/workers")).json()["workers"]
            assert sorted(w["url"] for w in workers) == sorted(slot["url"] for slot in slots)

            traffic = Traffic("/v1/images/generations", CUBE)
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(traffic.client, http, router.url)
                await wait_until(_answered(traffic, 8), timeout_s=30.0)

                victim = slots[1]
                os.kill(victim["actor_pid"], signal.SIGKILL)
                await wait_dead([victim["pid"]], timeout_s=30.0)  # the keeper ended it
                back = await _back(http, router.url, 1, victim)
                assert back["actor_pid"] != victim["actor_pid"]
                assert back["url"] != victim["url"]  # a new actor holds new ports
                assert "its actor died" in back["last_exit"]
                killed_at = trio.current_time()
                await wait_until(_answered_after(traffic, killed_at, 8), timeout_s=30.0)
                traffic.stop()
            assert traffic.answers and set(traffic.statuses) == {200}

            server = slots[2]
            os.kill(server["pid"], signal.SIGKILL)
            again = await _back(http, router.url, 2, server)
            assert again["actor_pid"] == server["actor_pid"]  # the same actor restarted it
            assert again["url"] == server["url"]  # on the ports it holds
            assert again["pid"] != server["pid"]
            response = await http.post(f"{router.url}/v1/images/generations", json=CUBE)
            assert response.status_code == 200

            # A server that reports itself failed (and would never exit) is stopped and
            # restarted once the health checker has marked it dead.
            failing = slots[3]
            fault = {"backend_failed": "Scheduler worker exited; restart the server."}
            await http.post(f"{failing['url']}/_sim/faults", json=fault)
            renewed = await _back(http, router.url, 3, failing)
            assert renewed["last_exit"].startswith("reported itself failed: Scheduler worker")
            assert renewed["url"] == failing["url"] and renewed["pid"] != failing["pid"]

            final = await _slots(http, router.url)
            pids = _pids(final) + _pids(slots)
            await _stopped_and_clean(router, ray_cluster, namespace, pids)


async def test_a_restarted_router_reattaches_to_detached_actors_and_applies_new_settings(
    ray_cluster: RayCluster, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    namespace = "reattach"
    with trio.fail_after(TEST_TIMEOUT_S):
        async with _router(ray_cluster, tmp_path, namespace, 2, detach=True) as first:
            before = await _slots(http, first.url)
            assert [slot["state"] for slot in before] == ["ready"] * 2
            assert await first.stop() == 0
        pids = _pids(before)
        assert all(alive(pid) for pid in pids), "detached workers must outlive the router"

        async with _router(ray_cluster, tmp_path, namespace, 2, detach=True) as second:
            after = await _slots(http, second.url)
            keys = ("url", "pid", "actor_pid", "node_id")
            assert [{k: s[k] for k in keys} for s in after] == [
                {k: s[k] for k in keys} for s in before
            ]
            assert all(slot["restarts"] == 0 and slot["state"] == "ready" for slot in after)
            assert "re-attached to actor" in "\n".join(second.output)
            response = await http.post(f"{second.url}/v1/images/generations", json=CUBE)
            assert response.status_code == 200
            assert await second.stop() == 0

        # Other settings: the same actors (same node, ports, URL) start new servers.
        changed = "--default-steps 20"
        async with _router(
            ray_cluster, tmp_path, namespace, 2, detach=False, extra_args=changed
        ) as third:
            renewed = await _slots(http, third.url)
            for old, new in zip(before, renewed, strict=True):
                assert (new["url"], new["actor_pid"]) == (old["url"], old["actor_pid"])
                assert new["pid"] != old["pid"] and new["restarts"] == 0
            await wait_dead([slot["pid"] for slot in before])
            await _stopped_and_clean(third, ray_cluster, namespace, pids + _pids(renewed))


async def test_workers_of_a_lost_node_come_back_on_a_node_that_joins_later(
    ray_cluster: RayCluster, tmp_path: Path, http: httpx.AsyncClient
) -> None:
    namespace = "nodeloss"
    doomed = await trio.to_thread.run_sync(ray_cluster.command, "add")
    with trio.fail_after(TEST_TIMEOUT_S):
        # Six one-GPU workers fill the three nodes: two of them land on the added node.
        async with _router(ray_cluster, tmp_path, namespace, 6, detach=False) as router:
            slots = await _slots(http, router.url)
            lost = [slot for slot in slots if slot["node_id"] == doomed]
            assert len(lost) == 2 and all(slot["state"] == "ready" for slot in slots)
            await trio.to_thread.run_sync(ray_cluster.command, f"remove {doomed}")
            await wait_dead([slot["pid"] for slot in lost], timeout_s=30.0)

            async def waiting_for_room() -> bool:
                now = await _slots(http, router.url)
                return all(
                    now[slot["index"]]["state"] == "starting"
                    and "waiting for Ray to place" in now[slot["index"]]["detail"]
                    for slot in lost
                )

            await wait_until(waiting_for_room, timeout_s=60.0, interval_s=0.2)
            response = await http.post(f"{router.url}/v1/images/generations", json=CUBE)
            assert response.status_code == 200  # the other four serve meanwhile

            joined = await trio.to_thread.run_sync(ray_cluster.command, "add")
            for slot in lost:
                back = await _back(http, router.url, slot["index"], slot)
                assert back["node_id"] == joined
                assert "its actor died" in back["last_exit"]
            final = await _slots(http, router.url)
            await _stopped_and_clean(router, ray_cluster, namespace, _pids(final))


async def test_a_launch_that_fails_says_why_and_leaves_nothing(
    ray_cluster: RayCluster, tmp_path: Path
) -> None:
    namespace = "broken"
    config = _router_toml(ray_cluster, namespace, 1, detach=True).replace(
        json.dumps(SIM_WORKER), json.dumps([sys.executable, "-c", "print('no model'); exit(3)"])
    )
    path = tmp_path / "router.toml"
    path.write_text(config)
    with trio.fail_after(TEST_TIMEOUT_S):
        result = await trio.run_process(
            [sys.executable, "-m", "dsrouter", "run", "--port", "0", "--config", str(path)],
            env={**os.environ, **ray_cluster.env, "DSROUTER_RUNTIME_DIR": str(tmp_path / "run")},
            capture_stderr=True,
            capture_stdout=True,
            check=False,
        )
        errors = result.stderr.decode()
        assert result.returncode == 1, errors
        assert "exited during start-up (exit status 3)" in errors
        assert "no model" in errors  # the last output lines of the server
        # Even with detach = true: a pool that never came up is not kept.
        left = await trio.to_thread.run_sync(ray_cluster.leftovers, namespace)
        assert left == {"actors": [], "placement_groups": []}


async def test_a_reload_applies_the_restart_policy_and_reports_the_rest_as_restart_only() -> None:
    old = LauncherConfig(backend="ray", model="a", num_workers=2)
    pool = RayPool(old, [], Progress(0))
    new = attrs.evolve(old, model="b", max_restarts=1, stop_timeout_s=3.0)
    change = await pool.reconfigure(new)
    assert change.in_place == ("launcher.max_restarts", "launcher.stop_timeout_s")
    assert change.restart_only == ("launcher.model",)
    assert pool.apply(change, 30.0) == []  # nothing rolls
    assert (pool.cfg.model, pool.cfg.max_restarts) == ("a", 1)


def _answered(traffic: Traffic, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(traffic.answers) >= count

    return check


def _answered_after(traffic: Traffic, moment: float, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return len(traffic.after(moment)) >= count

    return check


async def _back(
    http: httpx.AsyncClient, router: str, index: int, before: dict[str, Any]
) -> dict[str, Any]:
    """Slot `index` once it is ready again after a restart."""
    found: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal found
        found = (await _slots(http, router))[index]
        # A slot waiting for room may time out a placement and try again: at least one
        # restart, however many attempts the wait took.
        return found["state"] == "ready" and found["restarts"] > before["restarts"]

    try:
        await wait_until(check, timeout_s=60.0, interval_s=0.2)
    except AssertionError:
        raise AssertionError(f"slot {index} not back: {found} (before: {before})") from None
    return found
