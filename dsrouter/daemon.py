"""The root nursery: every long-lived task of the router, and the order they stop in.

    registry task      capability probes the registry asks for
    health checker     probe rounds every `health.interval_s`
    launcher           supervised local workers (when `[launcher]` asks for any), and the
                       rolling restart a reload hands to it (`reloader.pool`)
    HTTP frontend      hypercorn serving Quart (admin) + the streaming proxy
    notifier           systemd WATCHDOG pings and STATUS lines after READY=1 (notify.py)

Shutdown: the first SIGINT/SIGTERM sets `shutdown`, which makes hypercorn stop accepting and
drain in-flight requests for up to `server.drain_timeout_s`; when `serve` returns, the root
scope is cancelled, which stops probing and terminates the worker processes. A second signal
cancels the root scope at once.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

import httpx
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from dsrouter.app import create_app
from dsrouter.auth import Auth
from dsrouter.config import Config
from dsrouter.context import RouterContext
from dsrouter.control import PoolControl
from dsrouter.frontend import Frontend, MetricsOnly
from dsrouter.health import HealthChecker
from dsrouter.launcher import LaunchError, run_pool
from dsrouter.metrics import Metrics
from dsrouter.notify import Notifier, describe_pool
from dsrouter.policies import make_policy
from dsrouter.proxy import Proxy
from dsrouter.registry import Registry
from dsrouter.reload import Reloader
from dsrouter.upstream import Upstream

log = logging.getLogger("dsrouter")


def _hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
    host = config.server.host
    hc.bind = [f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"]
    hc.graceful_timeout = config.server.drain_timeout_s
    hc.keep_alive_timeout = config.server.keep_alive_timeout_s
    hc.h11_max_incomplete_size = config.server.max_header_kb * 1024
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


def _control_client(config: Config) -> httpx.AsyncClient:
    """Probes, broadcasts and fan-out reads: small bodies, bounded by cancel scopes."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(connect=config.server.connect_timeout_s, read=None, write=60,
                              pool=30),
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        follow_redirects=False,
        trust_env=False,
    )


async def run_router(config: Config, loader: Callable[[], Config] | None = None,
                     task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the router until SIGINT/SIGTERM (or cancellation); reports bound addresses.

    `loader` re-reads the configuration for SIGHUP and `POST /admin/reload`.
    """
    shutdown = trio.Event()
    serving = trio.Event()
    upstream = Upstream(connect_timeout_s=config.server.connect_timeout_s)
    async with _control_client(config) as client:
        registry = Registry(config.health, make_policy(config.routing.algorithm),
                            routing=config.routing, max_jobs=config.routing.max_jobs,
                            default_spu=config.cost.default_seconds_per_unit)
        health = HealthChecker(registry, client, upstream, config.health)
        context = RouterContext(config=config, registry=registry, health=health, client=client,
                                metrics=Metrics(registry))
        auth = Auth(config.security)
        control = PoolControl(context)
        app = create_app(context, control)
        frontend = Frontend(app, Proxy(context, upstream), auth)
        notifier = Notifier()
        reloader = Reloader(context, frontend, loader or (lambda: config), notifier)
        app.config["DSROUTER_RELOAD"] = reloader
        _warn_if_exposed(config, auth)
        async with trio.open_nursery() as root:
            root.start_soon(_watch_signals, shutdown, serving, frontend, notifier,
                            root.cancel_scope)
            root.start_soon(_watch_reload_signal, reloader)
            await root.start(registry.run, health.capabilities, control.catch_up)
            root.start_soon(upstream.run)
            for worker in config.workers:
                registry.add(worker.url, api_key=worker.api_key, source="config")
            await root.start(health.run)
            if config.launcher.num_workers:
                reloader.pool = await root.start(run_pool, config.launcher, registry,
                                                 context.metrics.restarts.inc)
            binds = await root.start(_serve, frontend, config, shutdown, root.cancel_scope)
            if config.server.metrics_port:
                metrics_binds = await root.start(_serve_metrics, frontend, context, config,
                                                 shutdown)
                for bind in metrics_binds:
                    print(f"dsrouter metrics on {bind}/metrics", flush=True)
            serving.set()
            for bind in binds:
                print(f"dsrouter listening on {bind}", flush=True)
            await _first_probes(registry, config)
            notifier.ready(describe_pool(registry.summary()))
            root.start_soon(notifier.run_watchdog)
            root.start_soon(notifier.run_status, lambda: describe_pool(registry.summary()))
            task_status.started(binds)
        upstream.close_idle()


async def _serve_metrics(frontend: Frontend, context: RouterContext, config: Config,
                         shutdown: trio.Event,
                         task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
                         ) -> None:
    hc = _hypercorn_config(config)
    host = config.server.host
    port = config.server.metrics_port
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    await serve(MetricsOnly(context.metrics.render, frontend), hc,
                shutdown_trigger=shutdown.wait, task_status=task_status)


async def _serve(frontend: Frontend, config: Config, shutdown: trio.Event,
                 root: trio.CancelScope,
                 task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
    await serve(frontend, _hypercorn_config(config), shutdown_trigger=shutdown.wait,
                task_status=task_status)
    log.info("frontend drained; stopping workers")
    root.cancel()


async def _first_probes(registry: Registry, config: Config) -> None:
    """Wait (bounded) until every registered worker has been probed once, so READY=1 tells
    systemd about a pool whose state is known rather than one still `starting`."""
    with trio.move_on_after(config.health.timeout_s + 1.0):
        while any(w.last_probe_at is None for w in registry.workers()):
            with trio.move_on_after(0.1):
                await registry.changed.wait()


async def _watch_signals(shutdown: trio.Event, serving: trio.Event, frontend: Frontend,
                         notifier: Notifier, root: trio.CancelScope) -> None:
    """Before the frontend serves there is nothing to drain: a signal during start-up (say,
    while the launcher waits minutes for models to load) stops everything at once."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if not serving.is_set():
                log.info("%s during start-up: stopping", signal.Signals(signum).name)
                notifier.stopping()
                root.cancel()
                return
            if shutdown.is_set():
                log.warning("second %s: stopping now", signal.Signals(signum).name)
                root.cancel()
                return
            log.info("%s: draining in-flight requests", signal.Signals(signum).name)
            notifier.stopping()
            frontend.draining = True
            shutdown.set()


async def _watch_reload_signal(reloader: Reloader) -> None:
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        async for _ in signals:
            log.info("SIGHUP: reloading the configuration")
            await reloader.reload()


def _warn_if_exposed(config: Config, auth: Auth) -> None:
    if auth.admin_token or config.server.host in ("127.0.0.1", "::1", "localhost"):
        return
    log.warning(
        "!!! listening on %s with NO admin token: anyone who can reach this port can register "
        "workers, reload weights and put the pool to sleep. Set security.admin_token "
        "(or admin_token_env / admin_token_file). !!!", config.server.host)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return leaves


def main_run(config: Config, loader: Callable[[], Config]) -> int:
    try:
        trio.run(run_router, config, loader)
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        launch, rest = group.split(LaunchError)
        if launch is None:
            raise
        if rest is not None:
            log.error("other errors while the pool failed to start", exc_info=rest)
        for error in _leaves(launch):
            print(f"dsrouter: cannot launch the workers: {error}", file=sys.stderr, flush=True)
        return 1
    print("dsrouter stopped", file=sys.stderr, flush=True)
    return 0
