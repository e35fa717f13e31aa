"""A router launching real `sglang serve` workers through its own launcher, for one module.

Each test module of this tier shares one router and its workers (a real worker takes ~25 s
and ~2 GB to start), started by a module fixture with `launch_pool` and stopped at the end
by PID. The launcher runs the default `command = ["sglang", "serve"]` with the test plugin
turned on by `launcher.env`, `--sleep-on-idle` (an idle scheduler otherwise spins a core)
and an output directory of the test's own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import httpx

from tests.launcher.helpers import free_port_block
from tests.workers import Process, path_with_venv, plugin_env, start_router


@attrs.define
class Pool:
    router: Process
    directory: Path
    models: dict[str, Path]

    @property
    def url(self) -> str:
        return self.router.url


def launch_pool(
    directory: Path, models: dict[str, Path], model: str, num_workers: int, step_s: float
) -> Pool:
    """Start the router with `num_workers` real workers of `models[model]`."""
    base = free_port_block(4 * num_workers)
    worker_env = {
        key: value
        for key, value in plugin_env(step_s=step_s, warmup_s=1.5).items()
        if key != "PATH"
    }
    launcher = {
        "model": str(models[model]),
        "num_workers": num_workers,
        "num_gpus_per_worker": 0,
        "worker_base_port": base,
        "port_stride": 2,
        "master_port_base": base + 2 * num_workers,
        "scheduler_port_base": base + 3 * num_workers,
        "extra_args": ["--sleep-on-idle", "--output-path", str(directory / "outputs")],
        "env": worker_env,
        "wait_timeout_s": 240.0,
        "stop_timeout_s": 15.0,
        "backoff_initial_s": 0.5,
        "backoff_max_s": 2.0,
        "log_dir": str(directory / "worker-logs"),
    }
    lines = [f"{key} = {json.dumps(value)}" for key, value in launcher.items() if key != "env"]
    env_lines = [f"{key} = {json.dumps(value)}" for key, value in worker_env.items()]
    config = "\n".join(
        [
            "[server]",
            "drain_timeout_s = 10",
            "[health]",
            "interval_s = 0.5",
            "failure_threshold = 2",
            "[launcher]",
            *lines,
            "[launcher.env]",
            *env_lines,
            "",
        ]
    )
    env = {"PATH": path_with_venv(), "DSROUTER_RUNTIME_DIR": str(directory / "run")}
    router = start_router(config, directory, env)
    return Pool(router, directory, models)


async def managed(client: httpx.AsyncClient, pool: Pool) -> list[dict[str, Any]]:
    """The launcher's slots, in index order, whatever their state."""
    slots = (await client.get(f"{pool.url}/workers")).json()["managed_workers"]
    return sorted(slots, key=lambda slot: slot["index"])


async def registered(client: httpx.AsyncClient, pool: Pool) -> dict[str, dict[str, Any]]:
    """Registered workers by URL."""
    return {w["url"]: w for w in (await client.get(f"{pool.url}/workers")).json()["workers"]}
