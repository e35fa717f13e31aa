"""dsrouter benchmarks: figures, not pass/fail. Loopback only, bounded in time.

    python bench/run.py                 # every section
    python bench/run.py --only a,d      # some sections
    python bench/run.py --write         # also rewrite bench/RESULTS.md

(a) added latency of the router for small requests, (b) throughput and router CPU per
request over 4 zero-latency workers, (c) streaming speed and memory for big answers,
(d) a heterogeneous workload per policy against an offline earliest-finish-time oracle,
(e) a pool of 1,000 workers: probe-loop CPU and per-request routing cost,
(f) the job map: cost of one insert when empty and at capacity,
(g) scenarios that try to fool least-work each against the oracle on its trace,
(h) tenants over a saturated pool: GPU shares with and without fair queuing, interactive
    queue wait under a bulk flood with and without priority classes.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import attrs
import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_seconds, percentile, router, rss_mib, simworkers

BASE = """
[server]
max_connections = 10000
[logging]
access_log = false
[health]
interval_s = 2.0
"""
INSTANT = ["--sec-per-mpx-step", "0"]
MiB = 1024 * 1024
results: dict[str, dict[str, object]] = {}
options = argparse.Namespace()


def section_a() -> None:
    """Median and p99 latency of 1 KiB requests, direct vs through the router."""
    body = {"prompt": "x" * 900, "size": "8x8", "response_format": "url", "seed": 1}
    with simworkers(["--task-type", "T2I", *INSTANT]) as urls, router(BASE, urls) as (url, _):

        def timings(target: str, count: int = 400) -> list[float]:
            out = []
            with httpx.Client(timeout=30) as client:
                for _ in range(50):
                    client.post(f"{target}/v1/images/generations", json=body)
                for _ in range(count):
                    start = time.perf_counter()
                    client.post(f"{target}/v1/images/generations", json=body)
                    out.append((time.perf_counter() - start) * 1000)
            return out

        direct, routed = timings(urls[0]), timings(url)
    figures = {
        "direct_p50_ms": percentile(direct, 50),
        "direct_p99_ms": percentile(direct, 99),
        "router_p50_ms": percentile(routed, 50),
        "router_p99_ms": percentile(routed, 99),
    }
    figures["added_p50_ms"] = figures["router_p50_ms"] - figures["direct_p50_ms"]
    figures["added_p99_ms"] = figures["router_p99_ms"] - figures["direct_p99_ms"]
    results["a"] = figures


def section_b() -> None:
    """Requests/s at concurrency 64 over 4 zero-latency workers; router CPU per request."""
    if not shutil.which("wrk"):
        results["b"] = {"skipped": "wrk not installed (apt-get install wrk)"}
        return
    specs = [["--task-type", "T2I", *INSTANT]] * 4
    figures: dict[str, object] = {}
    for policy in ("least-work", "least-request", "round-robin", "random"):
        config = BASE + f'[routing]\nalgorithm = "{policy}"\n'
        with simworkers(*specs) as urls, router(config, urls) as (url, pid):
            subprocess.run(
                ["wrk", "-t1", "-c64", "-d3s", f"{url}/server_info"],
                capture_output=True,
                check=True,
            )
            before = cpu_seconds(pid)
            out = subprocess.run(
                ["wrk", "-t1", "-c64", "-d10s", f"{url}/server_info"],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
            cpu = cpu_seconds(pid) - before
        rate = float(
            next(line.split()[1] for line in out.splitlines() if line.startswith("Requests/sec"))
        )
        figures[policy] = {"req_per_s": rate, "router_cpu_ms_per_req": cpu / (rate * 10) * 1000}
    results["b"] = figures


def section_c() -> None:
    """MB/s and router RSS growth for a 256 MiB download and 8 MiB b64 answers (c=8)."""
    size = 256 * MiB
    worker = ["--task-type", "T2I,T2V", *INSTANT, "--video-bytes", str(size)]
    with simworkers(worker) as urls, router(BASE, urls) as (url, pid):
        with httpx.Client(timeout=120) as client:
            job = client.post(
                f"{url}/v1/videos", json={"prompt": "p", "seconds": 1, "size": "64x64"}
            ).json()
            while client.get(f"{url}/v1/videos/{job['id']}").json()["status"] != "completed":
                time.sleep(0.1)
            rss_before = rss_mib(pid)
            start = time.perf_counter()
            received = 0
            with client.stream("GET", f"{url}/v1/videos/{job['id']}/content") as response:
                for chunk in response.iter_raw(1024 * 1024):
                    received += len(chunk)
            elapsed = time.perf_counter() - start
            download = {
                "mb_per_s": received / MiB / elapsed,
                "rss_growth_mib": rss_mib(pid, "VmHWM") - rss_before,
            }

        async def images() -> tuple[float, int]:
            payload = {
                "prompt": "big",
                "width": 2048,
                "height": 2048,
                "n": 1,
                "output_format": "png",
                "response_format": "b64_json",
            }
            total = 0
            async with httpx.AsyncClient(timeout=120) as client:

                async def one() -> None:
                    nonlocal total
                    for _ in range(4):
                        answer = await client.post(f"{url}/v1/images/generations", json=payload)
                        total += len(answer.content)

                start = time.perf_counter()
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(one)
            return time.perf_counter() - start, total

        rss_before = rss_mib(pid)
        elapsed, total = trio.run(images)
        b64 = {
            "mb_per_s": total / MiB / elapsed,
            "answer_mib": total / 32 / MiB,
            "rss_growth_mib": rss_mib(pid, "VmHWM") - rss_before,
        }
    results["c"] = {"download_256mib": download, "b64_images_c8": b64}


SPEEDS = (1.0, 1.0, 2.0, 4.0)
SEC_PER_UNIT = 0.1
"""Seconds per megapixel-step at speed 1: a 1024x1024, 50-step image takes 5 s on the slowest
worker, 1.3 s on the fastest (a real GPU takes 5-30 s). `--sec-per-unit 0.01` replays the same
trace ten times faster, where the fixed per-request cost of Python workers and router on
two shared cores is no longer small next to the service times."""


def _trace(
    sec_per_unit: float, seed: int = 7, count: int = 240, load: float = 0.75
) -> list[dict[str, object]]:
    """A seeded mix of request sizes and steps (costs differ up to ~80x), Poisson arrivals."""
    rng = random.Random(seed)
    shapes = [(256, 256), (512, 512), (768, 768), (1024, 1024)]
    steps = [8, 16, 32, 50]
    requests = []
    for _ in range(count):
        width, height = rng.choice(shapes)
        requests.append(
            {"width": width, "height": height, "num_inference_steps": rng.choice(steps)}
        )
    mean_cost = statistics.mean(
        r["width"] * r["height"] / 1e6 * r["num_inference_steps"] for r in requests
    )
    rate = load * sum(SPEEDS) / (mean_cost * sec_per_unit)
    t = 0.0
    for request in requests:
        t += rng.expovariate(rate)
        request["at"] = t
    return requests


def _oracle(trace: list[dict[str, object]], sec_per_unit: float) -> list[float]:
    """Offline earliest-finish-time: exact service times, FIFO per worker."""
    free = [0.0] * len(SPEEDS)
    latencies = []
    for request in trace:
        cost = request["width"] * request["height"] / 1e6 * request["num_inference_steps"]
        finishes = [
            max(request["at"], free[i]) + cost * sec_per_unit / speed
            for i, speed in enumerate(SPEEDS)
        ]
        best = min(range(len(SPEEDS)), key=finishes.__getitem__)
        free[best] = finishes[best]
        latencies.append(finishes[best] - request["at"])
    return latencies


def _summary(latencies: list[float], makespan: float) -> dict[str, float]:
    return {
        "mean_s": statistics.mean(latencies),
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "makespan_s": makespan,
    }


def section_d() -> None:
    """Heterogeneous workload over workers of speeds 1,1,2,4 at 75% load, per policy."""
    spu = options.sec_per_unit
    trace = _trace(spu)
    oracle = _oracle(trace, spu)
    last = max(r["at"] for r in trace)
    oracle_summary = _summary(
        oracle, max(r["at"] + lat for r, lat in zip(trace, oracle, strict=True))
    )
    specs = [
        ["--task-type", "T2I", "--sec-per-mpx-step", str(spu), "--speed", str(speed)]
        for speed in SPEEDS
    ]
    figures: dict[str, object] = {
        "sec_per_unit": spu,
        "oracle": oracle_summary,
        "requests": len(trace),
        "trace_span_s": last,
    }
    # "+queue:N": routing.max_inflight_per_worker = N, the rest waits in the router
    variants = [
        ("least-work+queue:1", "least-work", 1),
        ("least-work+queue:2", "least-work", 2),
        ("least-work", "least-work", 0),
        ("least-request", "least-request", 0),
        ("round-robin", "round-robin", 0),
        ("random", "random", 0),
    ]
    for name, policy, cap in _selected(variants):
        config = BASE + (
            f'[routing]\nalgorithm = "{policy}"\nmax_inflight_per_worker = {cap}\n'
            f"[cost]\ndefault_seconds_per_unit = {spu}\n"
        )
        with simworkers(*specs) as urls, router(config, urls) as (url, _):
            latencies, makespan = trio.run(_replay, url, trace)
        summary = _summary(latencies, makespan)
        summary["mean_vs_oracle"] = summary["mean_s"] / oracle_summary["mean_s"]
        summary["p99_vs_oracle"] = summary["p99_s"] / oracle_summary["p99_s"]
        figures[name] = summary
    results["d"] = figures


def _selected(variants: Sequence[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """The variants `--variants` names (all by default): repeats of one comparison take
    minutes instead of a quarter of an hour."""
    if not options.variants:
        return list(variants)
    wanted = options.variants.split(",")
    return [variant for variant in variants if variant[0] in wanted]


async def _replay(url: str, trace: list[dict[str, object]]) -> tuple[list[float], float]:
    latencies: list[float] = [0.0] * len(trace)
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as c:
        start = trio.current_time()

        async def one(index: int, request: dict[str, object]) -> None:
            await trio.sleep_until(start + request["at"])
            sent = trio.current_time()
            body = {k: v for k, v in request.items() if k != "at"}
            answer = await c.post(
                f"{url}/v1/images/generations",
                json={"prompt": "bench", "response_format": "url", **body},
            )
            answer.raise_for_status()
            latencies[index] = trio.current_time() - sent

        async with trio.open_nursery() as nursery:
            for index, request in enumerate(trace):
                nursery.start_soon(one, index, request)
        return latencies, trio.current_time() - start


@attrs.frozen
class Scenario:
    """A workload built to mislead a scheduler, and what the oracle knows about it."""

    name: str
    speeds: tuple[float, ...] = SPEEDS
    models: tuple[str, ...] = ()
    """Per worker: the model it serves (empty: all serve one model)."""
    joins_at_half: int | None = None
    """Index of a worker registered only halfway through the trace."""
    slows_at_half: int | None = None
    """Index of a worker that becomes `SLOWDOWN` x slower halfway through."""
    warmup: int = 0
    """Tiny requests (16x16, one step) sent one by one before the trace."""
    poisoned_share: float = 0.0
    """Share of requests whose cost fields lie (`true` sides beside a 4096x4096 size)."""


SLOWDOWN = 4.0
SCENARIOS = (
    Scenario("tiny-warmup", warmup=8),
    Scenario("slows-down", slows_at_half=3),
    Scenario("joins", joins_at_half=3),
    Scenario(
        "two-models", speeds=(1.0, 4.0, 1.0, 2.0), models=("sim/A", "sim/A", "sim/B", "sim/B")
    ),
    Scenario("adversarial-cost", poisoned_share=0.25),
)
SCENARIO_VARIANTS = (
    ("least-work+queue:1", "least-work", 1),
    ("least-work", "least-work", 0),
    ("least-request", "least-request", 0),
)
WAIT_EPSILON_S = 0.05
"""A request counts as waiting once it has not started this long after it was sent (the
router's and the worker's fixed time is not waiting)."""


def _scenario_trace(scenario: Scenario, spu: float, count: int = 160) -> list[dict[str, object]]:
    """A seeded mix as in (d), at 75% of the capacity present from the start; the request
    fields are what the client sends, `units` what the worker really runs."""
    rng = random.Random(14)
    present = [speed for i, speed in enumerate(scenario.speeds) if i != scenario.joins_at_half]
    trace = []
    for _ in range(count):
        side = rng.choice((256, 512, 768, 1024))
        steps = rng.choice((8, 16, 32, 50))
        body: dict[str, object] = {"width": side, "height": side, "num_inference_steps": steps}
        units = side * side / 1e6 * steps
        if rng.random() < scenario.poisoned_share:
            body = {
                "width": True,
                "height": True,
                "size": "4096x4096",
                "num_inference_steps": steps,
            }
            units = 1 / 1e6 * steps
        elif scenario.poisoned_share:
            body = {"size": f"{side}x{side}", "num_inference_steps": str(steps)}
        if scenario.models:
            capacity = {m: 0.0 for m in scenario.models}
            for model, speed in zip(scenario.models, scenario.speeds, strict=True):
                capacity[model] += speed
            models = sorted(capacity)
            body["model"] = rng.choices(models, [capacity[m] for m in models])[0]
        trace.append({"body": body, "units": units})
    mean_units = statistics.mean(r["units"] for r in trace)
    rate = 0.75 * sum(present) / (mean_units * spu)
    t = 0.0
    for request in trace:
        t += rng.expovariate(rate)
        request["at"] = t
    return trace


def _scenario_oracle(scenario: Scenario, trace: list[dict[str, object]], spu: float) -> list[float]:
    """Earliest finish with exact service times, knowing when a worker joins or slows."""
    half = trace[-1]["at"] / 2
    free = [half if i == scenario.joins_at_half else 0.0 for i in range(len(scenario.speeds))]
    latencies = []
    for request in trace:
        best, best_finish = -1, math.inf
        for i, speed in enumerate(scenario.speeds):
            if scenario.models and scenario.models[i] != request["body"]["model"]:
                continue
            start = max(request["at"], free[i])
            factor = SLOWDOWN if i == scenario.slows_at_half and start >= half else 1.0
            finish = start + request["units"] * spu / speed * factor
            if finish < best_finish:
                best, best_finish = i, finish
        free[best] = best_finish
        latencies.append(best_finish - request["at"])
    return latencies


def _longest_idle_while_waiting(
    scenario: Scenario,
    trace: list[dict[str, object]],
    served: list[tuple[float, float, str]],
    urls: list[str],
    joined_at: float,
) -> float:
    """The longest time a capable worker sat idle while some request it could serve waited.

    Reconstructed from the client's side: a worker runs one request at a time, so a request
    started when it was sent or when the worker's previous request ended, whichever is later.
    """
    starts: list[float] = [0.0] * len(trace)
    busy: dict[str, list[tuple[float, float]]] = {url: [] for url in urls}
    by_worker: dict[str, list[int]] = {}
    for index, (_, _, worker) in enumerate(served):
        by_worker.setdefault(worker, []).append(index)
    for worker, indices in by_worker.items():
        previous = 0.0
        for index in sorted(indices, key=lambda i: served[i][1]):
            sent, done, _ = served[index]
            starts[index] = max(sent, previous)
            previous = done
            busy[worker].append((starts[index], done))
    step = 0.02
    end = max(done for _, done, _ in served)
    longest = 0.0
    for w, url in enumerate(urls):
        since = None
        spans = sorted(busy[url])
        t = joined_at if w == scenario.joins_at_half else 0.0
        while t < end:
            idle = not any(a <= t < b for a, b in spans)
            waiting = idle and any(
                served[i][0] + WAIT_EPSILON_S <= t < starts[i]
                and (not scenario.models or trace[i]["body"]["model"] == scenario.models[w])
                for i in range(len(trace))
            )
            if waiting:
                since = t if since is None else since
                longest = max(longest, t - since + step)
            else:
                since = None
            t += step
    return longest


def section_g() -> None:
    """Scenarios against least-work (issue 14): mean and p99 vs the oracle, idle gaps."""
    spu = options.sec_per_unit
    figures: dict[str, object] = {"sec_per_unit": spu}
    for scenario in SCENARIOS:
        trace = _scenario_trace(scenario, spu)
        oracle = _scenario_oracle(scenario, trace, spu)
        result: dict[str, object] = {
            "requests": len(trace),
            "oracle": {"mean_s": statistics.mean(oracle), "p99_s": percentile(oracle, 99)},
        }
        specs = []
        for i, speed in enumerate(scenario.speeds):
            spec = ["--task-type", "T2I", "--sec-per-mpx-step", str(spu), "--speed", str(speed)]
            if scenario.models:
                spec += ["--model-path", scenario.models[i]]
            specs.append(spec)
        for name, policy, cap in _selected(SCENARIO_VARIANTS):
            config = BASE + (
                f'[routing]\nalgorithm = "{policy}"\nmax_inflight_per_worker = {cap}\n'
                f"[cost]\ndefault_seconds_per_unit = {spu}\n"
            )
            with simworkers(*specs) as urls:
                initial = [u for i, u in enumerate(urls) if i != scenario.joins_at_half]
                with router(config, initial) as (url, _):
                    served, joined_at = trio.run(_replay_scenario, url, urls, scenario, trace)
            latencies = [done - sent for sent, done, _ in served]
            summary = {
                "mean_s": statistics.mean(latencies),
                "p99_s": percentile(latencies, 99),
                "mean_vs_oracle": statistics.mean(latencies) / statistics.mean(oracle),
                "p99_vs_oracle": percentile(latencies, 99) / percentile(oracle, 99),
                "longest_idle_while_waiting_s": _longest_idle_while_waiting(
                    scenario, trace, served, urls, joined_at
                ),
                "requests_per_worker": [sum(1 for s in served if s[2] == u) for u in urls],
            }
            result[name] = summary
            print(f"    {scenario.name} {name}: {json.dumps(summary)}", flush=True)
        figures[scenario.name] = result
    results["g"] = figures


async def _replay_scenario(
    url: str, worker_urls: list[str], scenario: Scenario, trace: list[dict[str, object]]
) -> tuple[list[tuple[float, float, str]], float]:
    """Replay `trace`; returns (sent, done, worker url) per request (times from the trace's
    start) and when the joining worker was registered."""
    served: list[tuple[float, float, str]] = [(0.0, 0.0, "")] * len(trace)
    by_display: dict[str, str] = {}
    joined_at = math.inf
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as c:
        for _ in range(scenario.warmup):
            tiny = {"prompt": "warm", "size": "16x16", "num_inference_steps": 1}
            (await c.post(f"{url}/v1/images/generations", json=tiny)).raise_for_status()
        for worker in (await c.get(f"{url}/workers")).json()["workers"]:
            by_display[worker["display_id"]] = worker["url"]
        start = trio.current_time()
        half = trace[-1]["at"] / 2

        async def one(index: int, request: dict[str, object]) -> None:
            await trio.sleep_until(start + request["at"])
            sent = trio.current_time() - start
            answer = await c.post(
                f"{url}/v1/images/generations",
                json={"prompt": "bench", "response_format": "url", **request["body"]},
            )
            answer.raise_for_status()
            display = answer.headers["x-dsrouter-worker"]
            if display not in by_display:
                for worker in (await c.get(f"{url}/workers")).json()["workers"]:
                    by_display[worker["display_id"]] = worker["url"]
            served[index] = (sent, trio.current_time() - start, by_display[display])

        async def halfway() -> None:
            nonlocal joined_at
            await trio.sleep_until(start + half)
            if scenario.slows_at_half is not None:
                target = worker_urls[scenario.slows_at_half]
                answer = await c.post(f"{target}/_sim/faults", json={"slowdown": SLOWDOWN})
                answer.raise_for_status()
            if scenario.joins_at_half is not None:
                target = worker_urls[scenario.joins_at_half]
                answer = await c.post(f"{url}/workers", json={"url": target})
                answer.raise_for_status()
                joined_at = trio.current_time() - start

        async with trio.open_nursery() as nursery:
            nursery.start_soon(halfway)
            for index, request in enumerate(trace):
                nursery.start_soon(one, index, request)
    return served, joined_at


def section_e() -> None:
    """1,000 registered workers: probe-loop CPU share and per-request routing cost."""
    from dsrouter.config import HealthConfig, RoutingConfig
    from dsrouter.policies import make_policy
    from dsrouter.registry import ProbeOutcome, Registry

    count = 1000
    base_port = 21000
    with simworkers(["--task-type", "T2I", *INSTANT, "--port-range", f"{base_port}:{count}"]) as _:
        urls = [f"http://127.0.0.1:{base_port + i}" for i in range(count)]
        config = BASE.replace("interval_s = 2.0", "interval_s = 10.0")
        with router(config, urls) as (_, pid):
            time.sleep(2)
            before, start = cpu_seconds(pid), time.monotonic()
            time.sleep(30)
            share = (cpu_seconds(pid) - before) / (time.monotonic() - start)
    routing: dict[str, float] = {}
    for policy in ("least-work", "least-request", "round-robin", "random"):

        async def measure(policy: str = policy) -> float:
            registry = Registry(HealthConfig(), make_policy(policy), routing=RoutingConfig())
            for i in range(count):
                registry.add(f"http://w{i}:1")
                registry.apply_probe(f"http://w{i}:1", ProbeOutcome.OK)
            rounds = 2000
            begin = time.perf_counter()
            for _ in range(rounds):
                lease = await registry.acquire(cost=5.0)
                lease.release()
            return (time.perf_counter() - begin) / rounds * 1e6

        routing[policy] = trio.run(measure)
    results["e"] = {
        "workers": count,
        "probe_loop_cpu_share_of_a_core": share,
        "routing_us_per_request": routing,
    }


def section_f() -> None:
    """The job map: microseconds per insert, empty and at capacity (100,000 entries)."""
    from dsrouter.jobs import JobMap

    def per_insert(jobs: JobMap, prefix: str, count: int = 20000) -> float:
        begin = time.perf_counter()
        for i in range(count):
            jobs.remember(f"{prefix}{i}", "http://w:1", "videos", finished=i % 2 == 0)
        return (time.perf_counter() - begin) / count * 1e6

    capacity = 100_000
    empty = per_insert(JobMap(capacity * 10), "a")
    full = JobMap(capacity)
    per_insert(full, "warm", capacity)
    results["f"] = {
        "capacity": capacity,
        "insert_us_empty": empty,
        "insert_us_at_capacity": per_insert(full, "b"),
    }


TENANT_SPU = 0.05
BIG = {"size": "512x512", "num_inference_steps": 20}  # 5.2 units, 0.26 s
SMALL = {"size": "256x256", "num_inference_steps": 10}  # 0.66 units, 0.03 s


def section_h() -> None:
    """Two tenants on one worker (one request at a time), closed loops for 20 s each."""
    keys = (
        "[routing]\nmax_inflight_per_worker = 1\n[tenants]\naging_s = 600.0\n"
        '[[security.keys]]\ntenant = "a"\nkey = "ka"\npriority_class = "{a}"\n'
        '[[security.keys]]\ntenant = "b"\nkey = "kb"\npriority_class = "{b}"\n'
        '[[security.keys]]\ntenant = "a"\nkey = "ka2"\npriority_class = "{a}"\n'
    )
    spec = ["--task-type", "T2I", "--sec-per-mpx-step", str(TENANT_SPU)]
    figures: dict[str, object] = {"sec_per_unit": TENANT_SPU, "duration_s": 20}
    # Fair queuing: big jobs from tenant a, small ones from b ("ka2", the same tenant as
    # "ka", stands for "no fair queuing": one tenant, so one FIFO).
    # Classes: a bulk flood from a, an interactive trickle (1 request in flight) from b.
    variants = [
        ("fair: two tenants", dict(a="default", b="default"), "ka", "kb", 4, 4),
        ("fair: one tenant (FIFO)", dict(a="default", b="default"), "ka", "ka2", 4, 4),
        ("classes: bulk vs interactive", dict(a="bulk", b="interactive"), "ka", "kb", 8, 1),
        ("classes: same class", dict(a="default", b="default"), "ka", "kb", 8, 1),
        ("classes: neither (FIFO)", dict(a="default", b="default"), "ka", "ka2", 8, 1),
    ]
    with simworkers(spec) as urls:
        idle = None
        for name, classes, key_a, key_b, loops_a, loops_b in variants:
            with router(BASE + keys.format(**classes), urls) as (url, _):
                if idle is None:
                    idle = trio.run(_tenant_loops, url, [("kb", SMALL, 1)], 5.0)["kb"]
                    figures["small_alone_p99_s"] = percentile(idle["latencies"], 99)
                done = trio.run(
                    _tenant_loops, url, [(key_a, BIG, loops_a), (key_b, SMALL, loops_b)], 20.0
                )
            a, b = done[key_a], done[key_b]
            total = a["units"] + b["units"]
            figures[name] = {
                "share_big_tenant": a["units"] / total,
                "share_small_tenant": b["units"] / total,
                "small_p50_s": percentile(b["latencies"], 50),
                "small_p99_s": percentile(b["latencies"], 99),
                "small_requests": len(b["latencies"]),
            }
    results["h"] = figures


async def _tenant_loops(
    url: str, clients: list[tuple[str, dict[str, object], int]], duration_s: float
) -> dict[str, dict[str, object]]:
    """Closed loops: per (key, body, loops), `loops` clients sending back to back; the
    GPU units (from the simulator's cost formula) and latencies of answers per key."""
    done: dict[str, dict[str, object]] = {k: {"units": 0.0, "latencies": []} for k, _, _ in clients}
    stop = trio.current_time() + duration_s
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=None)) as c:

        async def loop(key: str, body: dict[str, object]) -> None:
            width, height = (int(x) for x in str(body["size"]).split("x"))
            units = width * height / 1e6 * int(body["num_inference_steps"])  # type: ignore[call-overload]
            while trio.current_time() < stop:
                sent = trio.current_time()
                answer = await c.post(
                    f"{url}/v1/images/generations",
                    json={"prompt": "bench", "response_format": "url", **body},
                    headers={"authorization": f"Bearer {key}"},
                )
                answer.raise_for_status()
                if trio.current_time() <= stop:
                    done[key]["units"] += units  # type: ignore[operator]
                    done[key]["latencies"].append(trio.current_time() - sent)  # type: ignore[union-attr]

        async with trio.open_nursery() as nursery:
            for key, body, loops in clients:
                for _ in range(loops):
                    nursery.start_soon(loop, key, body)
    return done


SECTIONS = {
    "a": section_a,
    "b": section_b,
    "c": section_c,
    "d": section_d,
    "e": section_e,
    "f": section_f,
    "g": section_g,
    "h": section_h,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="abcdefgh", help="sections, e.g. a,d")
    parser.add_argument("--write", action="store_true", help="rewrite bench/RESULTS.md")
    parser.add_argument(
        "--sec-per-unit",
        type=float,
        default=SEC_PER_UNIT,
        help="(d) seconds per megapixel-step at speed 1",
    )
    parser.add_argument(
        "--variants",
        default="",
        help="(d, g) only these policy variants, e.g. least-work+queue:1,least-work",
    )
    args = parser.parse_args(namespace=options)
    for name in args.only.replace(",", ""):
        print(f"--- section {name}: {SECTIONS[name].__doc__}", flush=True)
        started = time.monotonic()
        SECTIONS[name]()
        print(json.dumps(results[name], indent=2), flush=True)
        print(f"    ({time.monotonic() - started:.0f} s)", flush=True)
    if args.write:
        path = Path(__file__).with_name("RESULTS.md")
        path.write_text(render(args.only))
        print(f"wrote {path}")


def render(only: str) -> str:
    lines = [
        "# Benchmark results",
        "",
        f"Command: `python bench/run.py --only {only} --write` on "
        f"{platform.node() or 'this machine'} ({platform.machine()}, "
        f"{__import__('os').cpu_count()} cores, Python {platform.python_version()}), "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        "Raw figures per section (see the docstrings in bench/run.py):",
        "",
    ]
    for name in only.replace(",", ""):
        lines += [
            f"## ({name}) {SECTIONS[name].__doc__}",
            "",
            "```json",
            json.dumps(results[name], indent=2),
            "```",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
