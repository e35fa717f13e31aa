"""What the launcher will run: one `WorkerPlan` per worker, decided before anything starts.

Everything that can be known to fail before a process exists fails here, as a `LaunchError`:
a command that is not installed, a model that is missing, a port plan that overlaps itself,
too few GPUs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs

from dsrouter.config import LauncherConfig
from dsrouter.launcher.errors import LaunchError
from dsrouter.launcher.gpus import assign_gpus, discover_gpus, needs_discovery
from dsrouter.launcher.ports import WorkerPorts, plan_ports, scan_free_ports
from dsrouter.urls import InvalidWorkerURL, normalize_worker_url

T = TypeVar("T")


@attrs.frozen
class WorkerPlan:
    """One worker: how to start it and where the router reaches it."""

    index: int
    url: str
    ports: WorkerPorts
    gpus: tuple[str, ...]
    argv: tuple[str, ...]
    env: Mapping[str, str]
    """Added to the router's environment (launcher.env, then GPU pinning)."""


async def plan_pool(cfg: LauncherConfig, environ: Mapping[str, str]) -> list[WorkerPlan]:
    """Every worker's plan, or one `LaunchError` listing every reason the pool cannot start."""
    problems: list[str] = []
    if not cfg.command:
        problems.append("launcher.command is empty")
    elif shutil.which(cfg.command[0], path=environ.get("PATH")) is None:
        problems.append(
            f"launcher.command: {cfg.command[0]!r} not found on PATH; install it "
            "or give its full path"
        )
    if not cfg.model:
        problems.append("launcher.model is empty: the workers need --model-path")
    url_host = _reachable_host(cfg.worker_host)
    try:
        normalize_worker_url(f"http://{url_host}")
    except InvalidWorkerURL as exc:
        problems.append(f"launcher.worker_host: {exc}")
    ports = _collect(problems, plan_ports, cfg)
    visible = await discover_gpus(environ) if needs_discovery(cfg) else None
    gpus = _collect(problems, assign_gpus, cfg, visible)
    if problems or ports is None or gpus is None:
        raise LaunchError("\n".join(problems))
    plans = []
    for index in range(cfg.num_workers):
        env = dict(cfg.env)
        if cfg.num_gpus_per_worker:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[index])
        url = normalize_worker_url(f"http://{url_host}:{ports[index].http}")
        plans.append(
            WorkerPlan(index, url, ports[index], gpus[index], worker_argv(cfg, ports[index]), env)
        )
    return plans


def with_free_ports(cfg: LauncherConfig, plans: list[WorkerPlan]) -> list[WorkerPlan]:
    """The plans with every busy port moved to a free one (`launcher.scan_ports`)."""
    ports = scan_free_ports([plan.ports for plan in plans], cfg.worker_host)
    url_host = _reachable_host(cfg.worker_host)
    return [
        attrs.evolve(
            plan,
            ports=moved,
            url=normalize_worker_url(f"http://{url_host}:{moved.http}"),
            argv=worker_argv(cfg, moved),
        )
        for plan, moved in zip(plans, ports, strict=True)
    ]


def _collect(problems: list[str], decide: Callable[..., T], *args: Any) -> T | None:
    """Run one planning step; a `LaunchError` becomes a line in `problems`."""
    try:
        return decide(*args)
    except LaunchError as exc:
        problems.append(str(exc))
        return None


def worker_argv(cfg: LauncherConfig, ports: WorkerPorts) -> tuple[str, ...]:
    """`command` plus the flags the launcher owns, then `extra_args`.

    `--num-gpus` is left out when `num_gpus_per_worker` is 0 (no GPU pinning).
    """
    gpus = ("--num-gpus", str(cfg.num_gpus_per_worker)) if cfg.num_gpus_per_worker else ()
    return (
        *cfg.command,
        "--model-path",
        cfg.model,
        *gpus,
        "--host",
        cfg.worker_host,
        "--port",
        str(ports.http),
        "--master-port",
        str(ports.master),
        "--scheduler-port",
        str(ports.scheduler),
        "--strict-ports",
        "true",
        *cfg.extra_args,
    )


def _reachable_host(worker_host: str) -> str:
    """Where the router connects: loopback for wildcard binds, IPv6 in brackets."""
    if worker_host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if worker_host == "::":
        return "[::1]"
    return f"[{worker_host}]" if ":" in worker_host else worker_host
