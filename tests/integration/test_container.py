"""The Dockerfile: linted, checked for what the README promises, and its entry command run.

No image is built here (no Docker on CI). What can go wrong without building is checked
directly: hadolint's rules, a slim base, a non-root user, a HEALTHCHECK on `/livez`, and the
image's CMD and HEALTHCHECK commands, run as plain commands against a real router.
"""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import trio

from tests.support import free_port, wait_until

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
BIN = Path(sys.executable).parent
TEST_TIMEOUT_S = 30.0


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        keyword, _, rest = whole.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def _only(keyword: str) -> str:
    (value,) = [rest for key, rest in instructions() if key == keyword]
    return value


def _exec_form(text: str) -> list[str]:
    argv = json.loads(text)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), text
    return argv


def test_hadolint_passes() -> None:
    done = subprocess.run(
        [str(BIN / "hadolint"), "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=TEST_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_slim_base_non_root_user_and_a_livez_healthcheck() -> None:
    assert _only("FROM").startswith("python:3.11-slim")
    keys = [key for key, _ in instructions()]
    user = _only("USER")
    assert user not in ("root", "0") and keys.index("USER") < keys.index("CMD")
    options, _, command = _only("HEALTHCHECK").partition("CMD ")
    assert "--interval=" in options
    assert "http://127.0.0.1:30080/livez" in command
    assert _exec_form(_only("CMD")) == ["dsrouter", "run", "--config", "/etc/dsrouter/router.toml"]
    for key, rest in instructions():
        if key == "COPY":
            *sources, _ = shlex.split(rest)
            assert all((ROOT / source).exists() for source in sources), rest


def test_the_readme_documents_the_docker_run_line() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docker build -t dsrouter ." in readme
    assert '-v "$PWD/router.toml:/etc/dsrouter/router.toml:ro" dsrouter' in readme


async def test_the_entry_command_serves_and_its_healthcheck_passes(tmp_path: Path) -> None:
    """The image's CMD and HEALTHCHECK, as plain commands: only the config path and the
    port differ (a test cannot own /etc or port 30080)."""
    port = free_port()
    config = tmp_path / "router.toml"
    config.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n')
    command = [
        str(config) if arg == "/etc/dsrouter/router.toml" else arg
        for arg in _exec_form(_only("CMD"))
    ]
    command[0] = str(BIN / command[0])
    check = _exec_form(_only("HEALTHCHECK").partition("CMD ")[2])
    check = [sys.executable, *(arg.replace(":30080/", f":{port}/") for arg in check[1:])]

    async def healthy() -> bool:
        return (await trio.run_process(check, check=False, capture_stderr=True)).returncode == 0

    with trio.fail_after(TEST_TIMEOUT_S):
        router = await trio.lowlevel.open_process(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            await wait_until(healthy, timeout_s=TEST_TIMEOUT_S / 2, interval_s=0.1)
        finally:
            router.send_signal(signal.SIGTERM)
            assert await router.wait() == 0
