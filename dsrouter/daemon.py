"""The root nursery: every long-lived task of the router, and the order they stop in.

    root                 outlives every connection to the workers
      signal watcher     SIGINT/SIGTERM: drain, then stop (below)
      launcher           supervised workers (when `[launcher]` asks for any): local
                         processes, and the rolling restart a reload hands to them
                         (`reloader.pool`), or Ray actors (`backend = "ray"`)
      notifier           systemd WATCHDOG pings and STATUS lines after READY=1 (notify.py)
      services           everything that talks to the workers over HTTP
        reload watcher   SIGHUP
        registry task    capability probes and catch-ups the registry asks for
        pool sweep       closes idle connections to the workers (workers_http)
        health checker   probe rounds every `health.interval_s`
        HTTP frontend    hypercorn serving Quart (admin) + the streaming proxy
        metrics port     hypercorn serving `/metrics` alone (`server.metrics_port`)

Shutdown, on the first SIGINT/SIGTERM:
1. `frontend.draining` is set: the port stays open, `/health` answers 503
   `{"status": "draining"}` and every new request gets a 503, so clients and load balancers
   get an answer, not a refused connection. STOPPING=1 goes to systemd.
2. In-flight requests get up to `server.drain_timeout_s` to finish (`_drain`).
3. `shutdown` is set: hypercorn stops accepting, closes idle keep-alive connections and, after
   `CLOSE_GRACE_S`, cancels whatever still runs.
4. `serve` returns and cancels `services`: probing stops and the idle connections to the
   workers are closed.
5. The root scope is cancelled: the launcher stops the worker processes (SIGTERM, SIGKILL
   after `launcher.stop_timeout_s`). A worker holds no keep-alive connection of ours by
   then, so it has nothing to wait for. The Ray backend then kills the actors and removes
   their placement groups (unless `launcher.ray.detach`).
A second signal cancels the root scope at once.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys
from collections.abc import AsyncIterator, Callable

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from dsrouter import wire
from dsrouter.access import AccessLog
from dsrouter.app import create_app
from dsrouter.auth import Auth
from dsrouter.config import Config, LoadedConfig
from dsrouter.context import RouterContext
from dsrouter.control import PoolControl
from dsrouter.frontend import Frontend, MetricsOnly
from dsrouter.health import HealthChecker
from dsrouter.launcher import LaunchError, run_pool, run_ray_pool
from dsrouter.metrics import Metrics
from dsrouter.notify import Notifier, describe_pool
from dsrouter.policies import make_policy
from dsrouter.proxy import Proxy
from dsrouter.registry import Registry
from dsrouter.reload import Reloader
from dsrouter.units import KiB
from dsrouter.workers_http import WorkerHTTP

log = logging.getLogger("dsrouter")

CLOSE_GRACE_S = 1.0
"""hypercorn's `graceful_timeout`. The drain is over when hypercorn is told to stop, so this
only needs to cover sending the last answers and closing idle keep-alive connections; a
request still running after `server.drain_timeout_s` is cut this much later."""


def _hypercorn_config(config: Config) -> HypercornConfig:
    hc = HypercornConfig()
    host = config.server.host
    hc.bind = [f"[{host}]:{config.server.port}" if ":" in host else f"{host}:{config.server.port}"]
    hc.graceful_timeout = CLOSE_GRACE_S
    hc.keep_alive_timeout = config.server.keep_alive_timeout_s
    hc.h11_max_incomplete_size = config.server.max_header_kb * KiB
    hc.accesslog = None
    hc.errorlog = logging.getLogger("hypercorn.error")
    return hc


async def run_router(
    config: Config,
    loader: Callable[[], LoadedConfig] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the router until SIGINT/SIGTERM (or cancellation); reports bound addresses.

    `loader` re-reads the configuration for SIGHUP and `POST /admin/reload`.
    """
    wire.install()
    shutdown = trio.Event()
    serving = trio.Event()
    # Reads the context's configuration at each call (the context is built below), so a
    # reload's worker credentials apply at once.
    workers = WorkerHTTP(
        connect_timeout_s=config.server.connect_timeout_s,
        worker_api_key=lambda: context.config.security.worker_api_key,
    )
    registry = Registry(
        config.health,
        make_policy(config.routing.algorithm),
        routing=config.routing,
        max_jobs=config.routing.max_jobs,
        default_spu=config.cost.default_seconds_per_unit,
    )
    notifier = Notifier()
    # Received for the whole run, read only while the reload watcher runs: a SIGHUP while
    # the workers stop then waits here instead of killing the router (its default action).
    with trio.open_signal_receiver(signal.SIGHUP) as hangups:
        async with trio.open_nursery() as root:
            async with trio.open_nursery() as services:
                health = HealthChecker(registry, workers, config.health)
                context = RouterContext(
                    config=config,
                    registry=registry,
                    health=health,
                    workers=workers,
                    metrics=Metrics(registry),
                )
                auth = Auth(config.security)
                control = PoolControl(context)
                app = create_app(context, control)
                frontend = Frontend(
                    app,
                    Proxy(context),
                    auth,
                    AccessLog(context.metrics, lambda: context.config.logging),
                    lambda: context.config,
                )
                reloader = Reloader(
                    context,
                    frontend,
                    loader or (lambda: LoadedConfig(config, "(start-up)")),
                    notifier,
                    control,
                )
                app.config["DSROUTER_RELOAD"] = reloader
                _warn_if_exposed(config, auth)
                root.start_soon(
                    _watch_signals,
                    shutdown,
                    serving,
                    frontend,
                    notifier,
                    config.server.drain_timeout_s,
                    root.cancel_scope,
                )
                services.start_soon(_watch_reload_signal, hangups, reloader)
                await services.start(registry.run, health.capabilities, control.catch_up)
                services.start_soon(workers.run)
                for worker in config.workers:
                    registry.add(worker.url, api_key=worker.api_key, source="config")
                await services.start(health.run)
                if config.launcher.num_workers:
                    reloader.pool = await root.start(
                        run_ray_pool if config.launcher.backend == "ray" else run_pool,
                        config.launcher,
                        registry,
                        context.metrics.restarts.inc,
                        workers,
                    )
                binds = await services.start(
                    _serve, frontend, config, shutdown, services.cancel_scope
                )
                if config.server.metrics_port:
                    metrics_binds = await services.start(
                        _serve_metrics, frontend, context, config, shutdown
                    )
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
            # Drained, and nothing sends to the workers any more. Close the idle connections
            # before the workers are stopped, so none of them waits for one of ours.
            workers.close_idle()
            if config.launcher.num_workers:
                log.info("connections to the workers closed; stopping the launched workers")
            root.cancel_scope.cancel()


async def _serve_metrics(
    frontend: Frontend,
    context: RouterContext,
    config: Config,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    hc = _hypercorn_config(config)
    host = config.server.host
    port = config.server.metrics_port
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    await serve(
        MetricsOnly(context.metrics.render, frontend),
        hc,
        shutdown_trigger=shutdown.wait,
        task_status=task_status,
    )


async def _serve(
    frontend: Frontend,
    config: Config,
    shutdown: trio.Event,
    services: trio.CancelScope,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown` (set by `_drain`), then stop the rest of `services`.

    hypercorn must be stopped through its `shutdown_trigger`, not by cancellation, which
    would reset open connections and skip Quart's `after_serving`.
    """
    await serve(
        frontend, _hypercorn_config(config), shutdown_trigger=shutdown.wait, task_status=task_status
    )
    log.info("frontend closed")
    services.cancel()


async def _first_probes(registry: Registry, config: Config) -> None:
    """Wait (bounded) until every registered worker has been probed once, so READY=1 tells
    systemd about a pool whose state is known rather than one still `starting`."""
    with trio.move_on_after(config.health.timeout_s + 1.0):
        while any(w.last_probe_at is None for w in registry.workers()):
            with trio.move_on_after(0.1):
                await registry.changed.wait()


async def _watch_signals(
    shutdown: trio.Event,
    serving: trio.Event,
    frontend: Frontend,
    notifier: Notifier,
    drain_timeout_s: float,
    root: trio.CancelScope,
) -> None:
    """The first signal starts the drain; the next one stops everything at once.

    Before the frontend serves there is nothing to drain: a signal during start-up (say,
    while the launcher waits minutes for models to load) stops everything at once too.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not serving.is_set():
                    log.info("%s during start-up: stopping", name)
                    notifier.stopping()
                    root.cancel()
                    return
                if frontend.draining:
                    log.warning("second %s: stopping now", name)
                    root.cancel()
                    return
                log.info(
                    "%s: draining: new requests get 503, %d in flight may take up to "
                    "%g s (server.drain_timeout_s)",
                    name,
                    frontend.in_flight,
                    drain_timeout_s,
                )
                notifier.stopping()
                frontend.draining = True
                nursery.start_soon(_drain, frontend, drain_timeout_s, shutdown)


async def _drain(frontend: Frontend, timeout_s: float, shutdown: trio.Event) -> None:
    """Wait (up to `timeout_s`) for the requests in flight, then set `shutdown`.

    hypercorn keeps accepting until then, and the frontend answers every new request with
    a 503 while `draining` is set: that is what makes the drain visible to clients.
    """
    with trio.move_on_after(timeout_s):
        await frontend.wait_idle()
    if frontend.in_flight:
        log.warning(
            "server.drain_timeout_s (%g s) is over with %d request(s) in flight: "
            "they are cut in %g s",
            timeout_s,
            frontend.in_flight,
            CLOSE_GRACE_S,
        )
    else:
        log.info("drained: no request in flight")
    shutdown.set()


async def _watch_reload_signal(hangups: AsyncIterator[int], reloader: Reloader) -> None:
    async for _ in hangups:
        log.info("SIGHUP: reloading the configuration")
        await reloader.reload()


def _is_loopback(host: str) -> bool:
    """True when only this machine can connect: `localhost`, 127.0.0.0/8 or ::1.

    A host name other than `localhost` may resolve to any address, so it counts as exposed.
    """
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return address.is_loopback or (mapped is not None and mapped.is_loopback)


def _warn_if_exposed(config: Config, auth: Auth) -> None:
    if auth.admin_token or _is_loopback(config.server.host):
        return
    log.warning(
        "!!! listening on %s with NO admin token: anyone who can reach this port can register "
        "workers, reload weights and put the pool to sleep. Set security.admin_token "
        "(or admin_token_env / admin_token_file). !!!",
        config.server.host,
    )


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return leaves


def main_run(config: Config, loader: Callable[[], LoadedConfig]) -> int:
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
