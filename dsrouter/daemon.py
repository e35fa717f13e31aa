"""The root nursery: every long-lived task of the router, and the order they stop in.

Before any task starts, `bind` binds and listens on `server.port` (and
`server.metrics_port`): a port that is taken or a host that does not resolve ends the run
in one line before a worker is launched.

    root                 outlives every connection to the workers
      signal watcher     SIGINT/SIGTERM: drain, then stop (below)
      launcher           supervised workers (when `[launcher]` asks for any): local
                         processes, and the rolling restart a reload hands to them
                         (`reloader.pool`), or Ray actors (`backend = "ray"`)
      notifier           systemd STATUS lines from the moment the port serves (launch
                         progress, then the pool), WATCHDOG pings after READY=1 (notify.py)
      services           everything that talks to the workers over HTTP
        reload watcher   SIGHUP
        registry task    capability probes and catch-ups the registry asks for
        pool sweep       closes idle connections to the workers (workers_http)
        job events       one poller per watched video job (`GET /v1/videos/{id}/events`)
        health checker   probe rounds every `health.interval_s`
        HTTP frontend    hypercorn serving Quart (admin), the streaming proxy and the
                         WebSocket sessions (realtime.py)
        metrics port     hypercorn serving `/metrics` alone (`server.metrics_port`)

Start-up order: services (health checks, the registry task), then the HTTP frontend on the
bound sockets, then the launcher. While the launcher brings the workers up (minutes with
real models) the frontend answers `/livez`, `/health` and `/readyz` (503 "starting"),
`/workers` (`managed_workers` from `RouterContext.launch`) and `dsrouter status`. READY=1
and `dsrouter ready: ...` on stdout follow once the workers are up and probed.

Shutdown, on the first SIGINT/SIGTERM:
1. `frontend.draining` is set: the port stays open, `/health` answers 503
   `{"status": "draining"}` and every new request (and WebSocket upgrade) gets a 503, so
   clients and load balancers get an answer, not a refused connection. Job event streams
   end. STOPPING=1 goes to systemd.
2. In-flight requests and WebSocket sessions get up to `server.drain_timeout_s` to finish
   (`_drain`); the sessions still open then are closed with 1001 (both sides).
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

import contextlib
import ipaddress
import logging
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.config import Sockets
from hypercorn.trio.run import worker_serve
from hypercorn.utils import ASGIWrapper

from dsrouter import wire
from dsrouter.access import AccessLog
from dsrouter.app import create_app
from dsrouter.auth import Auth
from dsrouter.config import Config, LoadedConfig
from dsrouter.context import RouterContext
from dsrouter.control import PoolControl
from dsrouter.events import JobEvents
from dsrouter.frontend import Frontend, MetricsOnly
from dsrouter.health import HealthChecker
from dsrouter.launcher import LaunchError, run_pool, run_ray_pool
from dsrouter.logs import HTTP_LOGGER, announce
from dsrouter.metrics import Metrics
from dsrouter.notify import Notifier, describe_pool
from dsrouter.policies import make_policy
from dsrouter.proxy import Proxy
from dsrouter.realtime import Realtime
from dsrouter.registry import Registry
from dsrouter.reload import Reloader
from dsrouter.traced import traced
from dsrouter.tracing import Tracing, TracingUnavailable, make_tracing
from dsrouter.units import KiB, MiB
from dsrouter.workers_http import WorkerHTTP

log = logging.getLogger("dsrouter")

CLOSE_GRACE_S = 1.0
"""hypercorn's `graceful_timeout`. The drain is over when hypercorn is told to stop, so this
only needs to cover sending the last answers and closing idle keep-alive connections; a
request still running after `server.drain_timeout_s` is cut this much later."""


class BindError(Exception):
    """The router cannot listen where it is told to; the message is one line for the operator."""


@attrs.frozen
class BoundSockets:
    main: Sockets
    metrics: Sockets | None
    """`server.metrics_port`, when one is set."""


def bind(config: Config) -> BoundSockets:
    """Bind and listen on `server.port` (and `server.metrics_port`), or raise `BindError`.

    Done before anything else starts, so a busy port or an unresolvable `server.host` is
    reported in one line before a worker has loaded a model, and the port answers
    (`/health` 503 "starting", `/workers`, `dsrouter status`) while the launcher waits.
    """
    ports = [("server.port", config.server.port)]
    if config.server.metrics_port:
        ports.append(("server.metrics_port", config.server.metrics_port))
    bound: list[Sockets] = []
    for key, port in ports:
        hc = _hypercorn_config(config, port)
        try:
            sockets = hc.create_sockets()
        except OSError as exc:
            for done in bound:
                for sock in done.insecure_sockets:
                    sock.close()
            reason = exc.strerror or str(exc)
            raise BindError(
                f"cannot listen on {hc.bind[0]} (server.host, {key}): {reason}"
            ) from None
        for sock in sockets.insecure_sockets:
            sock.listen(hc.backlog)
        bound.append(sockets)
    return BoundSockets(bound[0], bound[1] if len(bound) > 1 else None)


def _hypercorn_config(config: Config, port: int | None = None) -> HypercornConfig:
    hc = HypercornConfig()
    host = config.server.host
    port = config.server.port if port is None else port
    hc.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    hc.graceful_timeout = CLOSE_GRACE_S
    hc.keep_alive_timeout = config.server.keep_alive_timeout_s
    hc.h11_max_incomplete_size = config.server.max_header_kb * KiB
    hc.websocket_max_message_size = config.realtime.max_message_mb * MiB
    hc.accesslog = None
    hc.errorlog = logging.getLogger(HTTP_LOGGER)
    return hc


async def run_router(
    config: Config,
    loader: Callable[[], LoadedConfig] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    *,
    handle_signals: bool = True,
    span_exporter: Any = None,
) -> None:
    """Run the router until SIGINT/SIGTERM (or cancellation); reports bound addresses.

    `loader` re-reads the configuration for SIGHUP and `POST /admin/reload`. An embedded
    router (`embed.py`) leaves the signals to its host (`handle_signals=False`): they belong
    to the host program, and only the main thread may receive them. `span_exporter` (an
    OpenTelemetry `SpanExporter`) turns tracing on and receives every span, whatever
    `tracing.endpoint` says (see `dsrouter.tracing.make_tracing`).
    """
    wire.install()
    tracing = make_tracing(config.tracing, span_exporter)
    try:
        await _run_router(config, loader, task_status, handle_signals, tracing)
    finally:
        await tracing.aclose()


async def _run_router(
    config: Config,
    loader: Callable[[], LoadedConfig] | None,
    task_status: trio.TaskStatus[list[str]],
    handle_signals: bool,
    tracing: Tracing,
) -> None:
    shutdown = trio.Event()
    started = trio.Event()
    # Reads the context's configuration at each call (the context is built below), so a
    # reload's worker credentials apply at once.
    workers = WorkerHTTP(
        connect_timeout_s=config.server.connect_timeout_s,
        worker_api_key=lambda: context.config.security.worker_api_key,
    )
    registry = Registry(
        config.health,
        traced(make_policy(config.routing.algorithm)),
        routing=config.routing,
        max_jobs=config.routing.max_jobs,
        default_spu=config.cost.default_seconds_per_unit,
    )
    notifier = Notifier()
    # Bound before anything else starts: a busy port or a host that does not resolve fails
    # here, in one line, before a single worker loads a model.
    sockets = bind(config)
    # Received for the whole run, read only while the reload watcher runs: a SIGHUP while
    # the workers stop then waits here instead of killing the router (its default action).
    receiver = (
        trio.open_signal_receiver(signal.SIGHUP) if handle_signals else contextlib.nullcontext()
    )
    with receiver as hangups:
        async with trio.open_nursery() as root:
            async with trio.open_nursery() as services:
                health = HealthChecker(registry, workers, config.health)
                context = RouterContext(
                    config=config,
                    registry=registry,
                    health=health,
                    workers=workers,
                    metrics=Metrics(registry),
                    tracing=tracing,
                )
                auth = Auth(config.security, config.tenants)
                control = PoolControl(context)
                app = create_app(context, control)
                proxy = Proxy(context)
                access = AccessLog(
                    context.metrics, context.activity, lambda: context.config.logging
                )
                events = JobEvents(registry, workers, proxy.jobs, lambda: context.config)
                frontend = Frontend(
                    app,
                    proxy,
                    auth,
                    access,
                    lambda: context.config,
                    Realtime(registry, workers, access, lambda: context.config),
                    events,
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
                _hint_if_no_workers(config)
                if hangups is not None:
                    root.start_soon(
                        _watch_signals,
                        shutdown,
                        started,
                        frontend,
                        notifier,
                        config.server.drain_timeout_s,
                        root.cancel_scope,
                    )
                    services.start_soon(_watch_reload_signal, hangups, reloader)
                await services.start(registry.run, health.capabilities, control.catch_up)
                services.start_soon(workers.run)
                await services.start(events.run)
                for worker in config.workers:
                    registry.add(worker.url, api_key=worker.api_key, source="config")
                await services.start(health.run)
                binds = await services.start(
                    _serve, frontend, config, sockets.main, shutdown, services.cancel_scope
                )
                if sockets.metrics is not None:
                    metrics_binds = await services.start(
                        _serve_metrics, frontend, context, config, sockets.metrics, shutdown
                    )
                    for bind_ in metrics_binds:
                        announce(f"dsrouter metrics on {bind_}/metrics")
                for bind_ in binds:
                    announce(f"dsrouter listening on {bind_}")
                # Set before the STATUS task runs, so systemd never hears "0/0 workers
                # healthy" while the launcher has yet to create its slots.
                context.starting = bool(config.launcher.num_workers)
                root.start_soon(notifier.run_status, lambda: _describe(context))
                if config.launcher.num_workers:
                    reloader.pool = await root.start(
                        run_ray_pool if config.launcher.backend == "ray" else run_pool,
                        config.launcher,
                        registry,
                        context.metrics.count_restart,
                        workers,
                        context.show_launch,
                    )
                    context.starting = False
                started.set()
                await _first_probes(registry, config)
                status = _describe(context)
                notifier.ready(status)
                announce(f"dsrouter ready: {status}")
                root.start_soon(notifier.run_watchdog)
                task_status.started(binds)
            # Drained, and nothing sends to the workers any more. Close the idle connections
            # before the workers are stopped, so none of them waits for one of ours.
            workers.close_idle()
            if config.launcher.num_workers:
                log.info("connections to the workers closed; stopping the launched workers")
            root.cancel_scope.cancel()


def _describe(context: RouterContext) -> str:
    """The systemd STATUS line: launch progress while starting, then the pool."""
    if context.starting:
        if context.launch is None:
            return f"starting: launching {context.config.launcher.num_workers} workers"
        return f"starting: {context.launch.progress_line()}"
    return describe_pool(context.registry.summary())


async def _serve_metrics(
    frontend: Frontend,
    context: RouterContext,
    config: Config,
    sockets: Sockets,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await worker_serve(
        ASGIWrapper(MetricsOnly(context.metrics.render, frontend)),
        _hypercorn_config(config),
        sockets=sockets,
        shutdown_trigger=shutdown.wait,
        task_status=task_status,
    )


async def _serve(
    frontend: Frontend,
    config: Config,
    sockets: Sockets,
    shutdown: trio.Event,
    services: trio.CancelScope,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until `shutdown` (set by `_drain`), then stop the rest of `services`.

    hypercorn must be stopped through its `shutdown_trigger`, not by cancellation, which
    would reset open connections and skip Quart's `after_serving`.
    """
    await worker_serve(
        ASGIWrapper(frontend),
        _hypercorn_config(config),
        sockets=sockets,
        shutdown_trigger=shutdown.wait,
        task_status=task_status,
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
    started: trio.Event,
    frontend: Frontend,
    notifier: Notifier,
    drain_timeout_s: float,
    root: trio.CancelScope,
) -> None:
    """The first signal starts the drain; the next one stops everything at once.

    Before start-up is over there is nothing to drain (the frontend answers only health,
    status and worker lists while the launcher waits minutes for models to load): a signal
    then stops everything at once too.
    """
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not started.is_set():
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
                frontend.events.end_all()
                nursery.start_soon(_drain, frontend, drain_timeout_s, shutdown)


async def _drain(frontend: Frontend, timeout_s: float, shutdown: trio.Event) -> None:
    """Wait (up to `timeout_s`) for the requests in flight, then set `shutdown`.

    hypercorn keeps accepting until then, and the frontend answers every new request with
    a 503 while `draining` is set: that is what makes the drain visible to clients.
    """
    with trio.move_on_after(timeout_s):
        await frontend.wait_idle()
    if frontend.realtime.open_sessions:
        log.info("closing %d WebSocket session(s) (1001)", frontend.realtime.open_sessions)
        frontend.realtime.close_all()
        with trio.move_on_after(CLOSE_GRACE_S):
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


def _hint_if_no_workers(config: Config) -> None:
    """A bare `dsrouter run` serves an empty pool; say how to give it workers."""
    if config.workers or config.launcher.num_workers:
        return
    log.warning(
        "no workers configured: inference requests get 503 until one is added. Add one with "
        '`[[workers]] url = "http://HOST:PORT"` in router.toml or `--worker-urls URL`, launch '
        "some with `[launcher]` (or `--demo` for simulated ones), or register one while the "
        "router runs: `dsrouter workers add URL`"
    )


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return leaves


def main_run(config: Config, loader: Callable[[], LoadedConfig]) -> int:
    """Run the router to the end; every outcome is logged (JSON with `logging.format =
    "json"`), including an unexpected error's traceback, and becomes the exit status."""
    try:
        trio.run(run_router, config, loader)
    except KeyboardInterrupt:
        return 130
    except (BindError, TracingUnavailable) as exc:
        log.error("%s", exc)
        return 1
    except BaseExceptionGroup as group:
        launch, rest = group.split(LaunchError)
        if launch is None:
            log.critical("the router stopped on an unexpected error", exc_info=group)
            return 1
        if rest is not None:
            log.error("other errors while the pool failed to start", exc_info=rest)
        for error in _leaves(launch):
            for line in str(error).splitlines():
                log.error("cannot launch the workers: %s", line)
        return 1
    except Exception:
        log.critical("the router stopped on an unexpected error", exc_info=True)
        return 1
    log.info("dsrouter stopped")
    return 0
