"""Property test: arbitrary request targets, header sets and bodies against a running router.

Written as raw bytes on a socket (an HTTP client would tidy the targets up), thrown at a
router with an admin token in front of two simulated workers. For every request:
- the router itself answers no 5xx (a worker's own 5xx, marked `x-dsrouter-worker`, may
  pass through);
- nothing changes on the workers that needs the admin token (sleep, weights, LoRA, faults);
and after all of them the same router process still serves.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import free_port

TOKEN = "fuzz-admin-token"
CONTROL = [
    "/update_weights_from_disk",
    "/update_weights_from_tensor",
    "/update_weights_from_tensor_checker",
    "/release_memory_occupation",
    "/resume_memory_occupation",
    "/v1/set_lora",
    "/v1/merge_lora_weights",
    "/_sim/faults",
    "/workers",
    "/admin/reload",
]
OPEN = [
    "/health",
    "/v1/models",
    "/v1/images/generations",
    "/v1/videos",
    "/rollout/generate",
    "/v1/videos/x/content",
    "/metrics",
    "/",
]
WRAPPERS = [
    "{}",
    "/{}",
    "{}/",
    "{}#x",
    "{}?a=b",
    "http://x{}",
    "http://127.0.0.1:1{}",
    "/./{}",
    "/v1/..{}",
    "{}%00",
    "//{}",
    "{}/../health",
    "{}%23",
]
target_text = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=60
)
targets = st.one_of(
    st.builds(
        lambda wrapper, path, encode: wrapper.format(path.replace("_", "%5F") if encode else path),
        st.sampled_from(WRAPPERS),
        st.sampled_from(CONTROL + OPEN),
        st.booleans(),
    ),
    target_text,
)
header_names = st.sampled_from(
    [
        "Content-Type",
        "Content-Length",
        "Transfer-Encoding",
        "Authorization",
        "Upgrade",
        "Connection",
        "X-Request-Id",
        "X-Dsrouter-Priority",
        "Expect",
        "Host",
        "X-Other",
    ]
)
header_values = st.one_of(
    st.sampled_from(
        [
            "application/json",
            "chunked",
            "websocket",
            "Bearer wrong",
            "0",
            "030",
            "-1",
            "100-continue",
            "Upgrade",
            "99999999999999999999",
            "h2c",
        ]
    ),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
)
json_values = st.recursive(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(
            st.sampled_from(
                [
                    "prompt",
                    "size",
                    "n",
                    "num_inference_steps",
                    "model_path",
                    "width",
                    "seed",
                    "seconds",
                    "x",
                ]
            ),
            inner,
            max_size=5,
        ),
    ),
    max_leaves=10,
)
bodies = st.one_of(
    st.just(b""), st.binary(max_size=64), json_values.map(lambda v: json.dumps(v).encode())
)


def _spawn(argv: list[str], marker: str, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start a process whose output goes to `log` (a pipe nobody reads would fill up and
    block it) and wait for the line carrying `marker`."""
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if marker in line:
                return process, line.split(marker, 1)[1].strip()
        if process.poll() is not None:
            break
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"{argv} did not print {marker!r}: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, list[str]]]:
    directory = tmp_path_factory.mktemp("fuzz")
    config = directory / "router.toml"
    config.write_text(
        f'[security]\nadmin_token = "{TOKEN}"\n[logging]\nlevel = "error"\naccess_log = false\n'
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        workers = []
        for _ in range(2):
            port = free_port()
            worker, _ = _spawn(
                [
                    sys.executable,
                    "-m",
                    "dsrouter.simworker",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--sec-per-mpx-step",
                    "0",
                    "--task-type",
                    "T2I,T2V",
                ],
                "simworker listening on",
                directory / f"worker-{port}.log",
            )
            processes.append(worker)
            workers.append(f"http://127.0.0.1:{port}")
        router, url = _spawn(
            [
                sys.executable,
                "-m",
                "dsrouter",
                "run",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--config",
                str(config),
                "--worker-urls",
                *workers,
            ],
            "dsrouter listening on",
            directory / "router.log",
        )
        processes.append(router)
        yield url, workers
        assert router.poll() is None, "the router exited"
        router.terminate()  # no connection a hostile client left behind may hold the stop
        assert router.wait(timeout=20) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.terminate()
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _exchange(url: str, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send `data`, read the answer until the server closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        with contextlib.suppress(OSError):  # answered and closed before reading it all
            sock.sendall(data)
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 "):
        return 0, {}, b""  # closed without an answer
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split(" ")[1]), headers, body


def _state(worker: str) -> dict[str, Any]:
    return httpx.get(f"{worker}/_sim/state", timeout=20).json()


@settings(
    max_examples=2000,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]),
    target=targets,
    headers=st.lists(st.tuples(header_names, header_values), max_size=5),
    body=bodies,
)
def test_hostile_requests_get_no_router_5xx_and_no_admin_effect(
    pool: tuple[str, list[str]],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> None:
    url, workers = pool
    lines = [f"{method} {target} HTTP/1.1", "Host: router", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body and not any(name in ("Content-Length", "Transfer-Encoding") for name, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    data = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
    status, answer_headers, answer = _exchange(url, data)
    if status >= 500:
        assert "x-dsrouter-worker" in answer_headers, (data[:300], status, answer[:200])
    for worker in workers:
        state = _state(worker)
        assert state["sleeping"] is False and state["weight_updates"] == 0, data[:300]
        assert state["loras"] == {} and state["faults"]["fail_rate"] == 0, data[:300]


def test_the_router_still_serves_after_the_fuzzing(pool: tuple[str, list[str]]) -> None:
    url, workers = pool
    health = httpx.get(f"{url}/health", timeout=20)
    assert health.status_code == 200 and health.json()["healthy_workers"] == len(workers)
