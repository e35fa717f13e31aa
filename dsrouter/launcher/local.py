"""Local worker processes, each a child task of the root nursery owning one process group.

Each worker gets explicit, well-separated ports (WORKER_API.md §1.2: port+1 is taken silently
by the worker's broker, so HTTP ports are `port_stride` >= 2 apart) and `--strict-ports` so a
collision fails fast. On cancellation the whole process group gets SIGTERM, then SIGKILL after
`stop_timeout_s`: no worker outlives the task that owns it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess

import attrs
import trio

from dsrouter.config import LauncherConfig
from dsrouter.registry import Registry

log = logging.getLogger("dsrouter.launcher")


@attrs.frozen
class WorkerSpec:
    index: int
    url: str
    argv: list[str]
    env: dict[str, str]


def plan_workers(cfg: LauncherConfig) -> list[WorkerSpec]:
    """The command line and environment of every worker the config asks for."""
    specs = []
    for index in range(cfg.num_workers):
        port = cfg.worker_base_port + index * cfg.port_stride
        argv = [
            *cfg.command,
            "--model-path", cfg.model,
            "--num-gpus", str(cfg.num_gpus_per_worker),
            "--host", cfg.worker_host,
            "--port", str(port),
            "--master-port", str(cfg.master_port_base + index * cfg.internal_port_stride),
            "--scheduler-port", str(cfg.scheduler_port_base + index * cfg.internal_port_stride),
            "--strict-ports", "true",
            *cfg.extra_args,
        ]
        env = dict(cfg.env)
        if index < len(cfg.gpu_ids):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(cfg.gpu_ids[index])
        host = "127.0.0.1" if cfg.worker_host in ("0.0.0.0", "") else cfg.worker_host
        if ":" in host:
            host = f"[{host}]"
        specs.append(WorkerSpec(index, f"http://{host}:{port}", argv, env))
    return specs


async def supervise(spec: WorkerSpec, registry: Registry, cfg: LauncherConfig,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run one worker process, registered while it lives, terminated when cancelled."""
    process = await trio.lowlevel.open_process(
        spec.argv, env={**os.environ, **spec.env}, start_new_session=True,
        stdin=subprocess.DEVNULL,
    )
    log.info("worker %d started: pid %d, %s", spec.index, process.pid, spec.url)
    registry.add(spec.url, managed={"pid": process.pid, "index": spec.index, "restarts": 0})
    task_status.started()
    try:
        code = await process.wait()
        log.warning("worker %d (pid %d) exited with status %s", spec.index, process.pid, code)
    finally:
        with trio.CancelScope(shield=True):
            await _stop_group(process, cfg.stop_timeout_s)
            registry.remove(spec.url)


async def _stop_group(process: trio.Process, timeout_s: float) -> None:
    """SIGTERM the worker's process group, then SIGKILL whatever is left after the timeout."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with trio.move_on_after(timeout_s):
        await process.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


async def run_pool(cfg: LauncherConfig, registry: Registry,
                   task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        for spec in plan_workers(cfg):
            await nursery.start(supervise, spec, registry, cfg)
        task_status.started()
