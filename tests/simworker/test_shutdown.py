"""SIGTERM on the simulated worker behaves like uvicorn in a real worker (WORKER_API.md 1.4).

Idle keep-alive connections are closed at once and requests in flight finish. A worker that
instead waited for idle connections until its graceful timeout (5 s) took that long to
stop whenever a router kept a connection to it, and a launcher with the same stop
timeout then SIGKILLed it.
"""

from __future__ import annotations

import signal

import httpx
import trio

from dsrouter.simworker.server import GRACEFUL_S
from tests.support import start_simworker, wait_until

PROMPT = {"prompt": "p", "size": "64x64", "response_format": "url"}


async def test_sigterm_with_idle_keep_alive_connections_exits_at_once() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(trust_env=False) as http:
            worker = await start_simworker(nursery, "--sec-per-mpx-step", "0")
            for _ in range(3):
                answer = await http.post(f"{worker.url}/v1/images/generations", json=PROMPT)
                assert answer.status_code == 200
                assert answer.headers.get("connection", "keep-alive") != "close"
            signalled_at = trio.current_time()
            worker.process.send_signal(signal.SIGTERM)
            with trio.fail_after(GRACEFUL_S + 5):
                code = await worker.process.wait()
            elapsed = trio.current_time() - signalled_at
            assert code == 0
            assert elapsed < GRACEFUL_S / 2, f"took {elapsed:.1f} s"
            nursery.cancel_scope.cancel()


async def test_sigterm_lets_the_request_in_flight_finish_then_exits() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery, httpx.AsyncClient(trust_env=False) as http:
            # 100x100 pixels x 2 steps at 100 s per megapixel-step: 2 s of work
            worker = await start_simworker(nursery, "--sec-per-mpx-step", "100")
            answers: list[httpx.Response] = []
            answered = trio.Event()
            answered_at: list[float] = []

            async def generate() -> None:
                answers.append(
                    await http.post(
                        f"{worker.url}/v1/images/generations",
                        json={**PROMPT, "size": "100x100", "num_inference_steps": 2},
                    )
                )
                answered_at.append(trio.current_time())
                answered.set()

            async def running() -> bool:
                # also leaves an idle keep-alive connection behind for the SIGTERM
                return (await http.get(f"{worker.url}/_sim/state")).json()["running"] == 1

            nursery.start_soon(generate)
            await wait_until(running)
            worker.process.send_signal(signal.SIGTERM)
            with trio.fail_after(GRACEFUL_S + 5):
                code = await worker.process.wait()
            exited_at = trio.current_time()
            assert code == 0
            with trio.fail_after(5):
                await answered.wait()
            assert answers[0].status_code == 200
            # and it did not then wait for the idle connection the polling left behind
            assert exited_at - answered_at[0] < GRACEFUL_S / 2
            assert answers[0].json()["data"][0]["url"]
            nursery.cancel_scope.cancel()
