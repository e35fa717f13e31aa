"""Process life of the simulated worker: ports, loading, warmup, serving, signals.

It follows a real worker's start-up order (`WORKER_API.md` section 1): the port stays closed
while "weights load" (`--load-s`), then HTTP comes up answering `/health` with an empty 503
while it "warms up" (`--warmup-s`), then it is ready.

On SIGTERM it does what uvicorn does: it stops accepting, closes idle keep-alive connections
at once and waits for requests in flight (bounded by `GRACEFUL_S` here, unlike uvicorn's
default); a second signal exits at once.

Closing idle connections at once relies on hypercorn's idle watcher, which is only running on
a connection if the last message of its previous answer was sent shielded (see
`asgi.send_response`); without that, every connection a client (the router) keeps alive held
the exit back by the whole `GRACEFUL_S`, and a launcher with a shorter stop timeout SIGKILLed
the worker.
"""

from __future__ import annotations

import logging
import signal
import socket
import sys

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve

from dsrouter.simworker.app import SimApp
from dsrouter.simworker.options import SimOptions, parse_options
from dsrouter.simworker.state import SimWorker
from dsrouter.wire import keep_websocket_close_codes

PORT_MOVE_STEP = 42
PORT_MOVE_TRIES = 100
GRACEFUL_S = 5.0
"""After SIGTERM, how long requests in flight may still run (uvicorn's
`--http-graceful-shutdown-timeout`); idle connections do not wait for it."""


class PortBusy(Exception):
    pass


def _free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def choose_port(host: str, port: int, strict: bool) -> int:
    """The worker's rule: a busy port fails with `--strict-ports`, else moves by +42."""
    if _free(host, port):
        return port
    if strict:
        raise PortBusy(f"port {port} on {host} is in use (--strict-ports true)")
    for attempt in range(1, PORT_MOVE_TRIES + 1):
        candidate = port + attempt * PORT_MOVE_STEP
        if candidate < 65536 and _free(host, candidate):
            print(f"simworker: port {port} is busy, using {candidate}", flush=True)
            return candidate
    raise PortBusy(f"no free port from {port} in +{PORT_MOVE_STEP} steps")


def _hold_broker_port(host: str, port: int) -> socket.socket | None:
    """Bind port+1 as a real worker's ZMQ broker does (with SO_REUSEADDR, as libzmq sets on
    every TCP listener, so a port the Ray backend's actor holds bound is usable); None when
    it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    broker = socket.socket(family, socket.SOCK_STREAM)
    broker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        broker.bind((host, port + 1))
        broker.listen(1)
    except OSError:
        broker.close()
        return None
    return broker


async def serve_workers(options: SimOptions) -> None:
    keep_websocket_close_codes()
    ports = [choose_port(options.host, port, options.strict_ports) for port in options.ports]
    if options.load_s:
        await trio.sleep(options.load_s)
    shutdown = trio.Event()
    brokers: list[socket.socket] = []
    async with trio.open_nursery() as root:
        workers = {port: SimWorker.create(options, port, root) for port in ports}
        if options.strict_ports and len(ports) == 1:
            broker = _hold_broker_port(options.host, ports[0])
            if broker is None:
                workers[
                    ports[0]
                ].faults.backend_failed = (
                    f"Broker task exited (port {ports[0] + 1} is in use); restart the server."
                )
            else:
                brokers.append(broker)
        root.start_soon(_watch_signals, shutdown, root.cancel_scope)
        config = HypercornConfig()
        host = f"[{options.host}]" if ":" in options.host else options.host
        config.bind = [f"{host}:{port}" for port in ports]
        config.graceful_timeout = GRACEFUL_S
        config.keep_alive_timeout = 5.0
        config.accesslog = None
        config.errorlog = logging.getLogger("simworker")
        binds = await root.start(
            _serve, SimApp(workers, options.require_api_key), config, shutdown, root.cancel_scope
        )
        for bind in binds:
            print(f"simworker listening on {bind}", flush=True)
        await trio.sleep(options.warmup_s)
        for worker in workers.values():
            worker.warm.set()
    for broker in brokers:
        broker.close()


async def _serve(
    app: SimApp,
    config: HypercornConfig,
    shutdown: trio.Event,
    root: trio.CancelScope,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)
    root.cancel()


async def _watch_signals(shutdown: trio.Event, root: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if shutdown.is_set():
                root.cancel()
                return
            shutdown.set()


def main(argv: list[str] | None = None) -> int:
    options = parse_options(argv)
    logging.basicConfig(level=logging.WARNING, format="simworker %(levelname)s %(message)s")
    try:
        trio.run(serve_workers, options)
    except PortBusy as exc:
        print(f"simworker: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
