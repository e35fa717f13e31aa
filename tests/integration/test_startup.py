"""Start-up as an operator sees it: the port is bound before any worker starts.

Launched workers here are the stdlib fake worker held at "loading" until the test creates a
gate file, so the start-up phase lasts exactly as long as the test needs it to.
"""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import httpx
import trio

from tests.launcher.helpers import FAKE_WORKER, launcher_settings
from tests.support import NotifySocket, free_port, router_process

TEST_TIMEOUT_S = 45.0


def _gated_pool(gate: Path, tmp_path: Path, num_workers: int = 2) -> str:
    settings: dict[str, Any] = launcher_settings(
        num_workers, FAKE_WORKER, extra_args=["--wait-for-file", str(gate)]
    )
    body = "\n".join(f"{key} = {json.dumps(value)}" for key, value in settings.items())
    return f"[health]\ninterval_s = 0.5\n\n[launcher]\n{body}\n"


async def test_the_port_answers_while_workers_start_and_systemd_hears_progress(
    tmp_path: Path, http: httpx.AsyncClient, notify: NotifySocket
) -> None:
    gate = tmp_path / "models-loaded"
    env = {"NOTIFY_SOCKET": notify.name, "DSROUTER_RUNTIME_DIR": str(tmp_path / "run")}
    with trio.fail_after(TEST_TIMEOUT_S):
        async with router_process(
            [], config=_gated_pool(gate, tmp_path), tmp_path=tmp_path, env=env, wait_ready=False
        ) as router:
            health = await http.get(f"{router.url}/health")
            assert health.status_code == 503
            assert health.json()["status"] == "starting"
            assert (await http.get(f"{router.url}/livez")).status_code == 200
            ready = await http.get(f"{router.url}/readyz")
            assert ready.status_code == 503
            assert ready.json()["reason"].startswith("starting")
            slots = (await http.get(f"{router.url}/workers")).json()["managed_workers"]
            assert [slot["state"] for slot in slots] == ["starting", "starting"]
            status = await trio.run_process(
                [sys.executable, "-m", "dsrouter", "status", "--url", router.url],
                capture_stdout=True,
            )
            header = status.stdout.decode().splitlines()[0]
            assert f"router {router.url}: starting, 0/2 workers routable, 2 starting" in header
            # The first lines may come before the launcher has its slots ("launching 2
            # workers"); every line before READY says the router is starting.
            while True:
                starting = await notify.next_with("STATUS")
                assert "READY" not in starting
                assert starting["STATUS"].startswith("starting: "), starting
                if starting["STATUS"].startswith("starting: 0/2 ready"):
                    break

            gate.touch()
            ready_message = await notify.next_with("READY")
            assert ready_message["STATUS"].startswith("2/2 workers healthy")
            assert not any("READY" in m for m in notify.messages[:-1])
            assert (await http.get(f"{router.url}/health")).status_code == 200
            assert (await http.get(f"{router.url}/readyz")).json() == {"status": "ready"}


async def _run_expecting_failure(argv: list[str], tmp_path: Path) -> tuple[int, list[str]]:
    env_path = tmp_path / "router.toml"
    gate = tmp_path / "never"
    env_path.write_text(_gated_pool(gate, tmp_path))
    with trio.fail_after(TEST_TIMEOUT_S):
        done = await trio.run_process(
            [sys.executable, "-m", "dsrouter", "run", "--config", str(env_path), *argv],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={"DSROUTER_RUNTIME_DIR": str(tmp_path / "run"), "PATH": "/usr/bin:/bin"},
        )
    output = (done.stdout + done.stderr).decode().splitlines()
    return done.returncode, output


async def test_a_busy_port_fails_in_one_line_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, lines = await _run_expecting_failure(
            ["--host", "127.0.0.1", "--port", str(port)], tmp_path
        )
    assert code == 1
    assert len(lines) == 1, lines
    assert f"cannot listen on 127.0.0.1:{port} (server.host, server.port)" in lines[0]
    assert "Address already in use" in lines[0]


async def test_an_unresolvable_host_fails_in_one_line_before_any_worker_starts(
    tmp_path: Path,
) -> None:
    port = free_port()
    code, lines = await _run_expecting_failure(
        ["--host", "no-such-host.invalid", "--port", str(port)], tmp_path
    )
    assert code == 2
    assert len(lines) == 1, lines
    assert "server.host: cannot resolve 'no-such-host.invalid'" in lines[0]
