"""Weights and sleep where they meet faults: no answer from weights the pool has moved past,
no work while the pool sleeps (issue: weights and sleep under faults).

Every simulated answer names the weights that produced it (`x-simworker-model-path`), so the
promises are checked on every response.
"""

from pathlib import Path

import httpx
import trio

from tests.support import (
    Answer,
    SimWorker,
    Traffic,
    healthy,
    routed_pool,
    router_process,
    start_simworker,
    wait_until,
)

NEW = "sim/step-1"
IMAGE = {"prompt": "a cube", "size": "64x64"}
WORK = ("--task-type", "T2I", "--sec-per-mpx-step", "0.2")
CONFIG = """
[health]
interval_s = 0.1
timeout_s = 1.0
failure_threshold = 1
breaker_open_s = 0.5
recovery_threshold = 1000
[routing]
retry_backoff_s = 0.01
"""
SLOW_PROBES = CONFIG.replace("interval_s = 0.1", "interval_s = 3.0")
"""Failed requests find the death and the breaker's trial comes long before a probe."""


def _name(worker: SimWorker) -> str:
    return f"127.0.0.1:{worker.port}"


def _weights(answer: Answer) -> str | None:
    return answer.headers.get("x-simworker-model-path")


def _worker(answer: Answer) -> str | None:
    return answer.headers.get("x-dsrouter-worker")


async def _state(http: httpx.AsyncClient, router: str, worker: SimWorker) -> str:
    workers = (await http.get(f"{router}/workers")).json()["workers"]
    return next(w["state"] for w in workers if w["url"] == worker.url)


async def _refit(http: httpx.AsyncClient, router: str) -> None:
    refit = await http.post(
        f"{router}/update_weights_from_disk", json={"model_path": NEW, "weight_version": NEW}
    )
    assert refit.status_code == 200 and refit.json()["success"] is True, refit.text


async def test_a_restarted_worker_serves_nothing_before_it_is_caught_up(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Killed after a refit and restarted on its launch weights: not even the breaker's
    trial request may reach it before the catch-up has confirmed the pool's weights."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            steady, victim = [await start_simworker(nursery, *WORK) for _ in range(2)]
            async with router_process(
                ["--worker-urls", steady.url, victim.url], config=SLOW_PROBES, tmp_path=tmp_path
            ) as router:
                await healthy(http, router.url, 2)
                await _refit(http, router.url)
                traffic = Traffic("/v1/images/generations", IMAGE)
                async with trio.open_nursery() as load:
                    for _ in range(6):
                        load.start_soon(traffic.client, http, router.url)
                    await victim.kill()

                    async def dead() -> bool:
                        return await _state(http, router.url, victim) == "dead"

                    await wait_until(dead)
                    restarted = await start_simworker(nursery, *WORK, port=victim.port)
                    back = trio.current_time()

                    async def serving() -> bool:
                        return any(_worker(a) == _name(restarted) for a in traffic.after(back))

                    await wait_until(serving, timeout_s=30)
                    traffic.stop()
                wrong = [a for a in traffic.answers if a.status == 200 and _weights(a) != NEW]
                assert wrong == [], [(_worker(a), _weights(a)) for a in wrong]
                state = (await http.get(f"{restarted.url}/_sim/state")).json()
                assert state["model_path"] == NEW
            nursery.cancel_scope.cancel()


async def test_a_worker_recovering_while_the_pool_sleeps_is_put_to_sleep(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """It recovers mid-sleep, under traffic: it serves nothing until the wake (not even
    between its catch-up and its own release), and after the wake serves the pool's
    weights."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            steady, victim = [await start_simworker(nursery, *WORK) for _ in range(2)]
            async with router_process(
                ["--worker-urls", steady.url, victim.url], config=CONFIG, tmp_path=tmp_path
            ) as router:
                await healthy(http, router.url, 2)
                await _refit(http, router.url)
                await victim.kill()

                async def dead() -> bool:
                    return await _state(http, router.url, victim) == "dead"

                await wait_until(dead)
                slept = await http.post(f"{router.url}/release_memory_occupation")
                assert slept.status_code == 200, slept.text
                traffic = Traffic("/v1/images/generations", IMAGE)
                async with trio.open_nursery() as load:
                    for _ in range(6):
                        load.start_soon(traffic.client, http, router.url)
                    restarted = await start_simworker(nursery, *WORK, port=victim.port)

                    async def asleep_too() -> bool:
                        state = (await http.get(f"{restarted.url}/_sim/state")).json()
                        return state["sleeping"] is True

                    await wait_until(asleep_too, timeout_s=30)
                    woke_at = trio.current_time()  # answers before this were all given asleep
                    woke = await http.post(f"{router.url}/resume_memory_occupation")
                    assert woke.status_code == 200, woke.text

                    async def both_serve() -> bool:
                        names = {_worker(a) for a in traffic.after(woke_at) if a.status == 200}
                        return names == {_name(steady), _name(restarted)}

                    await wait_until(both_serve, timeout_s=30)
                    traffic.stop()
                while_asleep = [a for a in traffic.answers if a.done_at < woke_at]
                assert while_asleep and all(a.status == 503 for a in while_asleep), [
                    (a.status, _worker(a)) for a in while_asleep if a.status != 503
                ]
                served = [a for a in traffic.answers if a.status == 200]
                assert all(_weights(a) == NEW for a in served)
            nursery.cancel_scope.cancel()


async def test_requests_waiting_through_a_release_get_asleep_once_the_pool_sleeps(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """A request waiting in the router queue when the release puts the pool to sleep gets
    the same 503 as one arriving later, not a wait until the wake."""
    slow = ("--task-type", "T2I", "--sec-per-mpx-step", "0.5")
    config = CONFIG + "max_inflight_per_worker = 1\n"
    with trio.fail_after(60):
        async with routed_pool(http, tmp_path, slow, config=config) as router:
            [worker] = router.workers
            # About 10 s of work: the release below arrives while it runs.
            long = {"prompt": "big", "size": "1024x1024", "num_inference_steps": 20}
            answers: dict[str, httpx.Response] = {}

            async def post(label: str, path: str, body: dict) -> None:
                answers[label] = await http.post(f"{router.url}{path}", json=body)

            async def queued() -> bool:
                return (await http.get(f"{router.url}/health")).json()["queued"] == 1

            async with trio.open_nursery() as clients:
                clients.start_soon(post, "long", "/v1/images/generations", long)
                await wait_until(lambda: _busy(http, worker))
                clients.start_soon(post, "waiting", "/v1/images/generations", IMAGE)
                await wait_until(queued)
                clients.start_soon(post, "release", "/release_memory_occupation", {})
                # Nobody wakes the pool: the waiting request must end by itself.
            assert answers["long"].status_code == 200
            assert answers["release"].status_code == 200, answers["release"].text
            assert answers["waiting"].status_code == 503
            assert answers["waiting"].json() == {"error": "pool is asleep"}
            assert int(answers["waiting"].headers["retry-after"]) > 0


async def _busy(http: httpx.AsyncClient, worker: SimWorker) -> bool:
    return (await http.get(f"{worker.url}/_sim/state")).json()["in_flight"] == 1


async def test_a_sleeping_worker_restarted_during_the_sleep_is_put_to_sleep_again(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Released, killed and restarted before the wake: the new process is awake (it holds
    the GPU memory the trainer expects free) although the router remembered the old one as
    asleep; the router must release it again, and after the wake it serves the pool's
    weights."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            steady, victim = [await start_simworker(nursery, *WORK) for _ in range(2)]
            async with router_process(
                ["--worker-urls", steady.url, victim.url], config=CONFIG, tmp_path=tmp_path
            ) as router:
                await healthy(http, router.url, 2)
                await _refit(http, router.url)
                slept = await http.post(f"{router.url}/release_memory_occupation")
                assert slept.status_code == 200, slept.text
                await victim.kill()

                async def dead() -> bool:
                    return (await http.get(f"{router.url}/health")).json()["dead_workers"] == 1

                await wait_until(dead)
                restarted = await start_simworker(nursery, *WORK, port=victim.port)

                async def asleep_again() -> bool:
                    state = (await http.get(f"{restarted.url}/_sim/state")).json()
                    return state["sleeping"] is True

                await wait_until(asleep_again, timeout_s=15)
                woke = await http.post(f"{router.url}/resume_memory_occupation")
                assert woke.status_code == 200, woke.text
                await healthy(http, router.url, 2)
                traffic = Traffic("/v1/images/generations", IMAGE)
                async with trio.open_nursery() as load:
                    for _ in range(4):
                        load.start_soon(traffic.client, http, router.url)

                    async def served() -> bool:
                        return any(_worker(a) == _name(restarted) for a in traffic.answers)

                    await wait_until(served, timeout_s=30)
                    traffic.stop()
                assert all(a.status == 200 and _weights(a) == NEW for a in traffic.answers)
            nursery.cancel_scope.cancel()


async def test_a_sleeping_worker_dead_through_the_wake_serves_once_it_is_back(
    tmp_path: Path, http: httpx.AsyncClient
) -> None:
    """Released, killed, and restarted only after the wake (its resume failed): it is
    caught up and serves at once, instead of staying "sleeping" until the next wake (and
    holding its GPU memory through the next sleep, which skips workers it thinks asleep)."""
    with trio.fail_after(90):
        async with trio.open_nursery() as nursery:
            steady, victim = [await start_simworker(nursery, *WORK) for _ in range(2)]
            async with router_process(
                ["--worker-urls", steady.url, victim.url], config=CONFIG, tmp_path=tmp_path
            ) as router:
                await healthy(http, router.url, 2)
                await _refit(http, router.url)
                slept = await http.post(f"{router.url}/release_memory_occupation")
                assert slept.status_code == 200, slept.text
                await victim.kill()

                async def dead() -> bool:
                    return (await http.get(f"{router.url}/health")).json()["dead_workers"] == 1

                await wait_until(dead)
                woke = await http.post(f"{router.url}/resume_memory_occupation")
                assert woke.status_code == 200, woke.text
                restarted = await start_simworker(nursery, *WORK, port=victim.port)

                async def caught_up() -> bool:
                    return await _state(http, router.url, restarted) == "healthy"

                await wait_until(caught_up, timeout_s=15)
                state = (await http.get(f"{restarted.url}/_sim/state")).json()
                assert state["model_path"] == NEW and state["sleeping"] is False
                slept = await http.post(f"{router.url}/release_memory_occupation")
                assert slept.status_code == 200, slept.text
                state = (await http.get(f"{restarted.url}/_sim/state")).json()
                assert state["sleeping"] is True
            nursery.cancel_scope.cancel()
