"""What `run` checks before it binds or launches anything, and `check-config` checks too.

`config.load` already rejects what the types and the secret sources can tell (bad values,
unknown keys, an unreadable `admin_token_file`). What is left needs the machine: whether
`server.host` resolves, and whether the launcher's plan can run here (the command on PATH,
a model, enough GPUs, `gpu_ids` for every worker, a port plan that does not overlap). Both
commands call `check`, so a file that `check-config` passes is one `run` accepts. A Ray
pool is planned on the cluster, not on this machine: `run_ray_pool` checks what it needs
when it connects.

A busy port is not checked here: the router may be running while its file is checked.
`run` finds out when it binds, before any worker starts (`daemon.bind`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

import trio

from dsrouter import tracing
from dsrouter.config import Config
from dsrouter.launcher import LaunchError
from dsrouter.launcher.plan import plan_pool


async def check(config: Config, source: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """Every problem found, one line each, prefixed with `source` like a `ConfigError`."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    host = config.server.host
    try:
        await trio.socket.getaddrinfo(host, config.server.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        problems.append(f"{source}: server.host: cannot resolve {host!r}: {exc.strerror}")
    if config.tracing.endpoint and not tracing.available():
        problems.append(
            f"{source}: tracing.endpoint: set, but the OpenTelemetry packages are not "
            "installed: pip install 'dsrouter[tracing]'"
        )
    if config.launcher.num_workers and config.launcher.backend == "local":
        try:
            await plan_pool(config.launcher, environ)
        except LaunchError as exc:
            problems += [f"{source}: {line}" for line in str(exc).splitlines()]
    return problems
