"""SIGTERM on a real router process: the drain answers, finishes what runs, then exits.

While it drains, the router must keep its port open and answer 503: a load balancer that
gets "connection refused" takes the router for dead instead of draining, and a client
cannot tell a refused connection from a crash. What was already running must finish (up to
`server.drain_timeout_s`), and a router with launched workers must stop them without
waiting for its own keep-alive connections (which used to end in a SIGKILL after
`launcher.stop_timeout_s`).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from tests.launcher.helpers import alive, free_port_block
from tests.support import SimWorker, healthy, router_process, start_simworker, wait_until

SLOW_WORKER = ("--sec-per-mpx-step", "100")
"""With this, `slow_image(n)` (100x100 pixels, n steps) keeps the worker busy n seconds."""
EXIT_MARGIN_S = 5.0
"""Slack for a loaded CI machine on top of what the router is allowed to take."""


def slow_image(seconds: int) -> dict[str, Any]:
    return {
        "prompt": "slow",
        "size": "100x100",
        "num_inference_steps": seconds,
        "response_format": "url",
    }


def router_config(drain_timeout_s: float) -> str:
    return (
        f"[server]\ndrain_timeout_s = {drain_timeout_s}\n\n"
        "[health]\ninterval_s = 0.3\ntimeout_s = 2.0\n"
    )


@attrs.define
class Call:
    """One request run in the background: its answer (or transport error) and when it ended."""

    response: httpx.Response | None = None
    error: httpx.TransportError | None = None
    done_at: float | None = None
    done: trio.Event = attrs.Factory(trio.Event)

    async def post(self, http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
        try:
            self.response = await http.post(url, json=body)
        except httpx.TransportError as exc:
            self.error = exc
        self.done_at = trio.current_time()
        self.done.set()


async def on_a_new_connection(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request on a connection of its own: what a client arriving during the drain sees
    (a kept-alive connection from before the signal would prove nothing about the port)."""
    async with httpx.AsyncClient(timeout=10, trust_env=False) as fresh:
        return await fresh.request(method, url, **kwargs)


async def sim_state(http: httpx.AsyncClient, worker: SimWorker) -> dict[str, Any]:
    return (await http.get(f"{worker.url}/_sim/state")).json()


async def running_on(http: httpx.AsyncClient, worker: SimWorker) -> None:
    async def busy() -> bool:
        return (await sim_state(http, worker))["running"] == 1

    await wait_until(busy)


async def wait_draining(router: str) -> None:
    """Poll `/health` on new connections until it turns 503; a refused connection raises."""

    async def draining() -> bool:
        return (await on_a_new_connection("GET", f"{router}/health")).status_code == 503

    await wait_until(draining, timeout_s=10)


async def test_sigterm_answers_503_to_new_requests_and_lets_the_one_in_flight_finish(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    drain_timeout_s = 30.0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            worker = await start_simworker(nursery, *SLOW_WORKER)
            async with router_process(
                ["--worker-urls", worker.url],
                config=router_config(drain_timeout_s),
                tmp_path=tmp_path,
            ) as router:
                await healthy(http, router.url, 1)
                call = Call()
                nursery.start_soon(
                    call.post, http, f"{router.url}/v1/images/generations", slow_image(3)
                )
                await running_on(http, worker)
                reached_worker = (await sim_state(http, worker))["requests_total"]
                signalled_at = trio.current_time()
                os.kill(router.pid, signal.SIGTERM)

                await wait_draining(router.url)
                health = await on_a_new_connection("GET", f"{router.url}/health")
                assert health.status_code == 503
                assert health.json() == {"status": "draining"}
                live = await on_a_new_connection("GET", f"{router.url}/livez")
                assert live.status_code == 200  # a liveness probe must not restart a drain
                ready = await on_a_new_connection("GET", f"{router.url}/readyz")
                assert (ready.status_code, ready.json()["reason"]) == (503, "draining")
                refused = await on_a_new_connection(
                    "POST", f"{router.url}/v1/images/generations", json=slow_image(1)
                )
                assert refused.status_code == 503
                assert refused.headers["content-type"] == "application/json"
                assert "draining" in refused.json()["error"]
                assert not call.done.is_set(), "the request in flight ended early"

                await call.done.wait()
                assert call.error is None, repr(call.error)
                assert call.response is not None and call.response.status_code == 200
                assert call.response.json()["data"][0]["url"]
                code = await router.process.wait()
                exited_at = trio.current_time()
            assert code == 0
            assert exited_at - signalled_at < drain_timeout_s
            assert call.done_at is not None
            # It waited for the request, not for drain_timeout_s.
            assert exited_at - call.done_at < EXIT_MARGIN_S
            # The 503s were the router's own: nothing more reached the worker.
            assert (await sim_state(http, worker))["requests_total"] == reached_worker
            nursery.cancel_scope.cancel()


async def test_a_request_still_running_at_drain_timeout_is_cut_and_the_router_exits(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    drain_timeout_s = 1.0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            worker = await start_simworker(nursery, *SLOW_WORKER)
            async with router_process(
                ["--worker-urls", worker.url],
                config=router_config(drain_timeout_s),
                tmp_path=tmp_path,
            ) as router:
                await healthy(http, router.url, 1)
                call = Call()
                nursery.start_soon(
                    call.post, http, f"{router.url}/v1/images/generations", slow_image(30)
                )
                await running_on(http, worker)
                signalled_at = trio.current_time()
                os.kill(router.pid, signal.SIGTERM)
                with trio.fail_after(drain_timeout_s + EXIT_MARGIN_S):
                    code = await router.process.wait()
                exited_at = trio.current_time()
            assert code == 0
            assert exited_at - signalled_at >= drain_timeout_s
            await call.done.wait()
            assert call.response is None or call.response.status_code != 200
            assert any(
                "server.drain_timeout_s (1 s) is over with 1 request(s) in flight" in line
                for line in router.output
            )

            async def abandoned() -> bool:
                return (await sim_state(http, worker))["in_flight"] == 0

            await wait_until(abandoned, timeout_s=5)  # the worker saw the router hang up
            nursery.cancel_scope.cancel()


async def test_a_second_sigterm_during_the_drain_stops_at_once(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            worker = await start_simworker(nursery, *SLOW_WORKER)
            async with router_process(
                ["--worker-urls", worker.url], config=router_config(30.0), tmp_path=tmp_path
            ) as router:
                await healthy(http, router.url, 1)
                call = Call()
                nursery.start_soon(
                    call.post, http, f"{router.url}/v1/images/generations", slow_image(30)
                )
                await running_on(http, worker)
                os.kill(router.pid, signal.SIGTERM)
                await wait_draining(router.url)
                assert not call.done.is_set()
                os.kill(router.pid, signal.SIGTERM)
                with trio.fail_after(EXIT_MARGIN_S):
                    code = await router.process.wait()
            assert code == 0
            await call.done.wait()
            assert call.response is None or call.response.status_code != 200
            assert any("second SIGTERM: stopping now" in line for line in router.output)
            nursery.cancel_scope.cancel()


async def test_the_demo_stops_its_workers_promptly_on_sigterm_without_sigkill(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Keep-alive connections exist on both sides (the test's client to the router, the
    router's proxy and probes to the workers): none of them may hold the exit back."""
    base = free_port_block(8)
    config = (
        f"[launcher]\nworker_base_port = {base}\nmaster_port_base = {base + 4}\n"
        f"scheduler_port_base = {base + 6}\n"
    )
    with trio.fail_after(60):
        async with router_process(
            ["--demo", "--demo-workers", "2"],
            config=config,
            tmp_path=tmp_path,
            env={"DSROUTER_RUNTIME_DIR": str(tmp_path / "run")},
        ) as router:
            workers = (await http.get(f"{router.url}/workers")).json()["workers"]
            pids = [w["supervisor"]["pid"] for w in workers if w["managed"]]
            assert len(pids) == 2 and all(map(alive, pids))
            for _ in range(6):
                answer = await http.post(
                    f"{router.url}/v1/images/generations", json={"prompt": "demo", "size": "64x64"}
                )
                assert answer.status_code == 200
            signalled_at = trio.current_time()
            # The demo's stop_timeout_s is 5 s: a worker that waited for an idle connection
            # would take that long and then be SIGKILLed.
            code = await router.stop(signal.SIGTERM, timeout_s=4.0)
            elapsed = trio.current_time() - signalled_at
            # Stopped by the router before it exited, not left to the parent-death signal.
            survivors = [pid for pid in pids if alive(pid)]
        assert code == 0
        assert survivors == []
        assert elapsed < 3.0, f"took {elapsed:.1f} s to stop"
        assert not [line for line in router.output if "SIGKILL" in line]
        assert sum("stopped by the router: exit status 0" in line for line in router.output) == 2
