"""Worker hosts, secret sources and reloads against real router processes (issue 12, items
2, 3, 6, 7, 9).

Each test is a way an operator's typo, a truncated file or a hostile registration used to
crash the router or open its control plane, and checks what the router does instead.
"""

import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.faults.test_faults import INSTANT
from tests.support import healthy, router_process, start_simworker, wait_until

TOKEN = "adm1n-t0ken"
KEY = "inference-k3y"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
UNSET = "DSROUTER_TEST_SURELY_UNSET_VARIABLE"

BAD_HOSTS = [
    "http://a..b:1",
    "http://\u00fc_.invalid:1",
    "http://" + "a" * 64 + ".example:1",
    "http://\u2460\u2465\u2468.\u2461\u2464\u2463.\u2460\u2465\u2468.\u2461\u2464\u2463",
    "http://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14",
    "http://169\u3002254\u3002169\u3002254",
    "http://127\uff0e0\uff0e0\uff0e1:1",
    "http://100.100.100.200",
    "http://192.0.0.192",
]
"""Each failed IDNA encoding in the prober (the router exited) or reached a metadata
address through the resolver's Unicode mapping."""


@pytest.fixture
async def admin() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=60, trust_env=False, headers=ADMIN) as client:
        yield client


async def dsrouter(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run `python -m dsrouter ARGS` to its end: exit status and stderr."""
    with trio.fail_after(20):
        done = await trio.run_process(
            [sys.executable, "-m", "dsrouter", *args],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={**os.environ, **(env or {})},
        )
    return done.returncode, done.stderr.decode()


async def test_registering_a_host_that_cannot_be_encoded_answers_400_and_the_router_lives(
    tmp_path: Path, admin: httpx.AsyncClient
) -> None:
    config = f'[security]\nadmin_token = "{TOKEN}"\n[health]\ninterval_s = 0.2\n'
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *INSTANT)
        async with router_process([], config=config, tmp_path=tmp_path) as router:
            for url in BAD_HOSTS:
                for answer in (
                    await admin.post(f"{router.url}/workers", params={"url": url}),
                    await admin.post(f"{router.url}/add_worker", json={"url": url}),
                ):
                    assert answer.status_code == 400, (url, answer.text)
                    assert "host" in answer.json()["error"], answer.text
            # Probe rounds run (the real worker turns healthy through them): before the fix,
            # the first round that probed `a..b` ended the process.
            added = await admin.post(f"{router.url}/workers", params={"url": worker.url})
            assert added.status_code == 200
            await healthy(admin, router.url, 1)
            listed = (await admin.get(f"{router.url}/workers")).json()["workers"]
            assert [w["url"] for w in listed] == [worker.url]
            assert router.process.returncode is None
            assert not any("Traceback" in line for line in router.output), router.output
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("url", ["http://a..b:1", "http://\uff11\uff12\uff17.0.0.1:1"])
async def test_a_worker_host_that_cannot_be_encoded_is_a_config_error_naming_key_and_file(
    tmp_path: Path, url: str
) -> None:
    path = tmp_path / "router.toml"
    path.write_text(f'[[workers]]\nurl = "{url}"\n')
    for command in ("check-config", "run"):
        status, err = await dsrouter(command, "--config", str(path), "--port", "0")
        assert status == 2, err
        assert err.startswith(f"config error: {path}: workers[0].url: expected a worker URL: "), err
    status, err = await dsrouter("check-config", "--worker-urls", url)
    assert status == 2 and err.startswith("config error: --worker-urls: "), err


async def test_an_unset_token_variable_stops_start_up_instead_of_opening_the_control_plane(
    tmp_path: Path,
) -> None:
    path = tmp_path / "router.toml"
    path.write_text(f'[security]\nadmin_token_env = "{UNSET}"\n')
    env = {k: v for k, v in os.environ.items() if k != UNSET}
    status, err = await dsrouter(
        "run", "--host", "127.0.0.1", "--port", "0", "--config", str(path), env=env
    )
    assert status == 2, err
    assert err.strip() == (
        f"config error: {path}: security.admin_token_env: environment variable '{UNSET}' is not set"
    )


async def test_a_reload_from_a_file_cut_short_keeps_token_keys_and_workers(
    tmp_path: Path, http: httpx.AsyncClient, admin: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *INSTANT)
        config = (
            f'[[workers]]\nurl = "{worker.url}"\n[health]\ninterval_s = 0.2\n'
            f'[security]\nadmin_token = "{TOKEN}"\napi_keys = ["{KEY}"]\n'
        )
        path = tmp_path / "router.toml"
        async with router_process([], config=config, tmp_path=tmp_path) as router:
            await healthy(admin, router.url, 1)

            path.write_text("")  # a truncated write, then SIGHUP
            os.kill(router.pid, signal.SIGHUP)

            async def rejected() -> bool:
                return any("reload rejected: " in line for line in router.output)

            await wait_until(rejected)
            assert (await http.get(f"{router.url}/workers")).status_code == 401
            image = {"prompt": "p", "size": "16x16"}
            denied = await http.post(f"{router.url}/v1/images/generations", json=image)
            assert denied.status_code == 401
            listed = (await admin.get(f"{router.url}/workers")).json()["workers"]
            assert [w["url"] for w in listed] == [worker.url]

            path.write_text("# router.toml\n[health]\ninterval_s = 0.2\n")
            answer = await admin.post(f"{router.url}/admin/reload")
            assert answer.status_code == 400
            errors = answer.json()["errors"]
            assert [e.split(": ")[:2] for e in errors] == [
                [str(path), "security.admin_token"],
                [str(path), "security.api_keys"],
                [str(path), "workers"],
            ]

            path.write_text('workers = []\n[security]\nadmin_token = ""\napi_keys = []\n')
            answer = await admin.post(f"{router.url}/admin/reload")
            assert answer.status_code == 200, answer.text
            body = answer.json()
            assert body["workers_removed"] == [worker.url]
            assert [w.split(":")[0] for w in body["security_weakened"]] == [
                "security.admin_token",
                "security.api_keys",
            ]
            assert any(
                "WARNING" in line and "reload weakens security: security.admin_token" in line
                for line in router.output
            ), router.output
            open_now = await http.get(f"{router.url}/workers")
            assert open_now.status_code == 200 and open_now.json()["workers"] == []
        nursery.cancel_scope.cancel()


async def test_a_reload_with_a_bad_worker_host_or_a_missing_secret_is_rejected(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = f'[security]\nadmin_token = "{TOKEN}"\n'
    path = tmp_path / "router.toml"
    env = {k: v for k, v in os.environ.items() if k != UNSET}
    async with router_process([], config=config, tmp_path=tmp_path, env=env) as router:
        path.write_text(
            config + '[[workers]]\nurl = "http://\u2460\u2465\u2468.\u2461\u2464\u2463.1.1:1"\n'
        )
        answer = await http.post(f"{router.url}/admin/reload", headers=ADMIN)
        assert answer.status_code == 400
        [error] = answer.json()["errors"]
        assert error.startswith(f"{path}: workers[0].url: expected a worker URL: "), error

        path.write_text(f'[security]\nadmin_token_env = "{UNSET}"\n')
        answer = await http.post(f"{router.url}/admin/reload", headers=ADMIN)
        assert answer.status_code == 400
        assert answer.json()["errors"] == [
            f"{path}: security.admin_token_env: environment variable '{UNSET}' is not set"
        ]
        assert (await http.get(f"{router.url}/workers")).status_code == 401
        assert router.process.returncode is None


async def test_admin_config_masks_secret_flags_in_launcher_command_lines(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = (
        f'[security]\nadmin_token = "{TOKEN}"\n[launcher]\n'
        'extra_args = "--api-key sk-PLAIN-1 --dit-precision bf16"\n'
        'command = ["sglang", "serve", "--api-key=sk-PLAIN-2"]\n'
    )
    async with router_process([], config=config, tmp_path=tmp_path) as router:
        answer = await http.get(f"{router.url}/admin/config", headers=ADMIN)
        assert answer.status_code == 200
        assert "PLAIN" not in answer.text
        launcher = answer.json()["launcher"]
        assert launcher["extra_args"] == ["--api-key", "***", "--dit-precision", "bf16"]
        assert launcher["command"] == ["sglang", "serve", "--api-key=***"]
