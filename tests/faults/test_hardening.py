"""Hostile and careless clients against a real router (issue: hardening).

Each test reproduces one way a client could bypass the admin token, crash a request with a
traceback, hold the router's capacity or take healthy workers out of rotation, and checks
the router's answer instead: a 4xx JSON error, one log line, and every worker untouched.
"""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.faults.test_faults import INSTANT, sim_faults
from tests.support import (
    RouterProcess,
    healthy,
    raw_request,
    routed_pool,
    router_process,
    start_simworker,
    wait_until,
    worker_state,
)

TOKEN = "s3cret-admin"
CONFIG = f"""
[security]
admin_token = "{TOKEN}"
[health]
interval_s = 0.25
failure_threshold = 2
breaker_open_s = 60
recovery_threshold = 1000
[routing]
retry_backoff_s = 0.01
"""


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The suite's client, with the admin token: set-up and checks are not under test."""
    headers = {"authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=60, trust_env=False, headers=headers) as client:
        yield client


def head(method: str, target: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: router", "Connection: close", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def untouched(http: httpx.AsyncClient, url: str) -> None:
    state = (await http.get(f"{url}/_sim/state")).json()
    assert state["sleeping"] is False and state["weight_updates"] == 0, state


async def test_no_spelling_of_a_control_route_reaches_a_worker(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """The simulated worker reduces targets the way uvicorn's httptools parser does, so
    every request the router forwarded here would run the control handler."""
    async with routed_pool(http, tmp_path, INSTANT, config=CONFIG) as router:
        [worker] = router.workers
        port = router.url.rsplit(":", 1)[1]
        refused = {
            "http://x/release_memory_occupation": 400,
            "http://127.0.0.1:1/release_memory_occupation": 400,
            "/release_memory_occupation#x": 400,
            "/update_weights_from_disk#x": 400,
            "//release_memory_occupation": 400,
            "/%2Frelease_memory_occupation": 400,
            "/v1/../release_memory_occupation": 400,
            "/v1/%2e%2e/release_memory_occupation": 400,
            "*": 400,
            "/_sim/faults": 404,
            "/_sim/state": 404,
            "/update_weights_from_tensor_checker": 401,
        }
        for target, status in refused.items():
            answer = await raw_request(
                router.url, head("POST", target, body=b'{"model_path": "x"}')
            )
            assert answer.status == status, (target, answer)
            assert "error" in answer.json(), target
        await untouched(http, worker.url)
        # An absolute-form target that names the router itself is served normally.
        own = await raw_request(router.url, head("GET", f"http://router:{port}/health"))
        assert own.status == 200 and own.json()["status"] == "healthy"
        forbidden = await raw_request(
            router.url, head("POST", f"http://router:{port}/release_memory_occupation")
        )
        assert forbidden.status == 401
        await untouched(http, worker.url)


async def test_http2_is_off_and_upgrades_get_the_same_checks(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """h2c upgrades are answered over HTTP/1.1 with the same target and token checks; the
    prior-knowledge preface is a malformed request. The router still stops at once."""
    async with routed_pool(http, tmp_path, INSTANT, config=CONFIG) as router:
        [worker] = router.workers
        upgrade = ("Upgrade: h2c", "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA")
        for target, status in {
            "http://x/release_memory_occupation": 400,
            "/release_memory_occupation#x": 400,
            "/release_memory_occupation": 401,
            "/health": 200,
        }.items():
            method = "GET" if target == "/health" else "POST"
            answer = await raw_request(router.url, head(method, target, *upgrade))
            assert answer.status == status, target
        preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        answer = await raw_request(router.url, preface)
        assert answer.status == 400 and "error" in answer.json()
        await untouched(http, worker.url)
        assert await router.stop(timeout_s=15) == 0


async def test_websocket_upgrades_get_auth_and_a_json_refusal(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *INSTANT)
        async with router_process(
            ["--worker-urls", worker.url], config=CONFIG, tmp_path=tmp_path
        ) as router:
            upgrade = (
                "Upgrade: websocket",
                "Connection: Upgrade",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version: 13",
            )
            request = (
                "GET /workers HTTP/1.1\r\nHost: router\r\n" + "\r\n".join(upgrade) + "\r\n\r\n"
            ).encode()
            answer = await raw_request(router.url, request)
            assert answer.status == 401 and answer.json() == {
                "error": "missing or invalid bearer token"
            }
            assert not any("Traceback" in line for line in router.output)
        nursery.cancel_scope.cancel()


async def test_malformed_heads_and_bodies_get_4xx_json_not_a_traceback(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = CONFIG + "[server]\nmax_header_kb = 16\n"
    async with trio.open_nursery() as nursery:
        worker = await start_simworker(nursery, *INSTANT)
        async with router_process(
            ["--worker-urls", worker.url], config=config, tmp_path=tmp_path
        ) as router:
            await healthy(http, router.url, 1)
            body = b'{"prompt": "a", "size": "8x8"}'
            # A leading zero is a valid length: served, with the router's own framing.
            zero = (
                head(
                    "POST",
                    "/v1/images/generations",
                    "Content-Type: application/json",
                    f"Content-Length: 0{len(body)}",
                )
                + body
            )
            assert (await raw_request(router.url, zero)).status == 200
            both = head(
                "POST",
                "/v1/images/generations",
                "Content-Type: application/json",
                f"Content-Length: {len(body)}",
                "Transfer-Encoding: chunked",
            ) + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
            smuggled = await raw_request(router.url, both)
            assert smuggled.status == 400 and "Transfer-Encoding" in smuggled.json()["error"]
            big_head = head("GET", "/v1/models", f"X-Filler: {'a' * 40_000}")
            oversized = await raw_request(router.url, big_head)  # one write, one read
            assert oversized.status == 431 and "max_header_kb" in oversized.json()["error"]
            absurd = [
                b'{"prompt": "a", "size": "8x8", "num_inference_steps": "Infinity"}',
                b'{"prompt": "a", "size": "8x8", "num_inference_steps": 1e400}',
                b'{"prompt": "a", "size": "8x8", "n": ' + b"9" * 400 + b"}",
                b'{"prompt": "a", "size": "99999999999x9"}',
                b"[" * 50_000 + b"]" * 50_000,
            ]
            for payload in absurd:
                answer = await http.post(
                    f"{router.url}/v1/images/generations",
                    content=payload,
                    headers={"content-type": "application/json"},
                )
                # The worker judges the body (a 4xx, or the plain-text 500 FastAPI gives for
                # nesting past Python's limit); the router itself never fails it.
                assert answer.headers.get("x-dsrouter-worker"), (payload[:60], answer.text)
                assert answer.status_code < 500 or answer.text == "Internal Server Error"
            await http.get(f"{router.url}/v1/models%0a2026-01-01 forged ERROR line")
        assert not any("Traceback" in line for line in router.output), router.output
        assert not any(line.startswith("forged") for line in router.output)
        assert any("%0a" not in line and "\\n2026-01-01 forged" in line for line in router.output)
        nursery.cancel_scope.cancel()


async def test_failed_generations_of_one_client_take_no_worker_out(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """`/rollout/generate` without `seed` makes a real worker answer a plain-text 500
    after the GPU work; before, nine of them ejected a three-worker pool."""
    async with routed_pool(http, tmp_path, *[INSTANT] * 3, config=CONFIG) as router:
        for _ in range(12):
            answer = await http.post(f"{router.url}/rollout/generate", json={"prompt": "p"})
            assert answer.status_code == 500
        health = (await http.get(f"{router.url}/health")).json()
        assert health["healthy_workers"] == 3, health


async def test_an_error_every_worker_gives_is_the_requests_fault(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[INSTANT] * 2, config=CONFIG) as router:
        workers = router.workers
        for worker in workers:
            await sim_faults(http, worker.url, unavailable_rate=1.0)
        for _ in range(6):
            answer = await http.post(
                f"{router.url}/v1/images/generations", json={"prompt": "p", "size": "8x8"}
            )
            assert answer.status_code == 503
            assert answer.headers["x-dsrouter-attempts"] == "2"
        for worker in workers:
            state = await worker_state(http, router.url, worker.url)
            assert state["is_dead"] is False, state


async def test_passive_health_ejects_at_most_half_the_pool(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    async with routed_pool(http, tmp_path, *[INSTANT] * 2, config=CONFIG) as router:
        workers = router.workers
        for worker in workers:
            await sim_faults(http, worker.url, unavailable_rate=0.5)
        for _ in range(40):
            await http.post(
                f"{router.url}/v1/images/generations", json={"prompt": "p", "size": "8x8"}
            )
        states = [await worker_state(http, router.url, w.url) for w in workers]
        assert sum(s["is_dead"] for s in states) <= 1, states


async def _trickle(router: RouterProcess, results: list[int]) -> None:
    """An upload of 1,000 bytes sent one byte every 0.5 s."""
    start = head(
        "POST",
        "/v1/images/generations",
        "Content-Type: application/json",
        "Content-Length: 1000",
    )
    answer = await raw_request(router.url, [start] + [b" "] * 1000, pause_s=0.5, timeout_s=30)
    results.append(answer.status)


async def test_trickling_uploads_are_cut_and_hold_no_slot(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = CONFIG + (
        "[server]\nmax_connections = 4\nbody_min_rate_kb_s = 1\nbody_rate_grace_s = 2\n"
    )
    async with routed_pool(http, tmp_path, INSTANT, config=config) as router:
        cut: list[int] = []
        async with trio.open_nursery() as crowd:
            for _ in range(8):
                crowd.start_soon(_trickle, router, cut)
            await trio.sleep(0.5)  # the crowd is connected and trickling
            for _ in range(5):
                answer = await http.post(
                    f"{router.url}/v1/images/generations",
                    json={"prompt": "p", "size": "8x8"},
                )
                assert answer.status_code == 200, answer.text
        assert cut == [408] * 8


async def test_request_bodies_held_in_memory_are_bounded(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    config = CONFIG + "[server]\nmax_buffered_mb = 1\nmax_control_body_mb = 4\n"
    async with routed_pool(http, tmp_path, INSTANT, config=config) as router:
        big = b'{"model_path": "' + b"x" * (2 * 1024 * 1024) + b'"}'
        control = head(
            "POST", "/update_weights_from_disk", f"Authorization: Bearer {TOKEN}", body=big
        )
        refused = await raw_request(router.url, control)
        assert refused.status == 503 and "max_buffered_mb" in refused.json()["error"]
        assert refused.headers["retry-after"] == "1"
        # An inference body past the budget streams instead (no replay copy): served.
        image = b'{"prompt": "' + b"p" * (2 * 1024 * 1024) + b'", "size": "8x8"}'
        served = await http.post(
            f"{router.url}/v1/images/generations",
            content=image,
            headers={"content-type": "application/json"},
        )
        assert served.status_code == 200


async def test_router_survives_hosts_and_targets_it_refuses(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """After all of the above kinds of input, the same process still serves."""
    async with routed_pool(http, tmp_path, INSTANT, config=CONFIG) as router:
        for target in ("http://x/", "/#", "/./", "*", "//health"):
            await raw_request(router.url, head("GET", target))

        async def serves() -> bool:
            return (await http.get(f"{router.url}/health")).status_code == 200

        await wait_until(serves, timeout_s=5)
        assert router.process.returncode is None


async def test_a_refused_request_with_a_long_body_does_not_wedge_its_connection(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A refusal sent before the body is read, with more body chunks behind it than
    hypercorn queues for the app: the connection still closes and the router still stops."""
    chunks = b"1\r\na\r\n" * 40 + b"0\r\n\r\n"
    async with routed_pool(http, tmp_path, INSTANT, config=CONFIG) as router:
        for target in ("/v1/images/generations#x", "http://elsewhere/v1/x", "/_sim/state"):
            data = head("POST", target, "Transfer-Encoding: chunked") + chunks
            answer = await raw_request(router.url, data, timeout_s=10)
            assert answer.status in (400, 404), (target, answer.status)
        assert await router.stop(timeout_s=15) == 0
