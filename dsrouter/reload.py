"""Reloading router.toml while serving (SIGHUP or `POST /admin/reload`).

The new file is loaded with the same flags as at start-up; if it is invalid the reasons are
logged and returned, and the running configuration is kept. A valid one is applied at once:
static workers are added and removed (workers registered through the API or launched by the
router are left alone), routing, health, timeouts, limits and security take effect for the
next request or probe round. Settings that need a new socket are reported as needing a
restart.

A changed `[launcher]` goes to the running pool (`dsrouter.launcher.rolling` decides key by
key): restart policy and timeouts apply at once; a new command line or environment is rolled
out one worker at a time by a task of the launcher's nursery, so the reload answers at once
with the workers it scheduled (`rolling_restart`) and the roll goes on in the background; a
reload during a roll retargets it. Settings that cannot roll (`num_workers`, ports, log
files) are reported as needing a restart. New launcher settings that cannot run (a command
not on PATH, too few GPUs) reject the whole reload, like an invalid file.

A file caught half-written (empty, or cut short) is valid TOML that says nothing: applied,
it would drop the admin token, the API keys and every static worker. So a reload that
removes the admin token, all API keys (`api_keys`, `[[security.keys]]`) or all `[[workers]]`
is refused unless the new file sets that key to empty in so many words (`admin_token = ""`,
`api_keys = []`, `keys = []`, `workers = []`). Tenants' limit state lives in the proxy
(`tenants.Quotas`, by tenant name), so a reload keeps it. Every reload that weakens
security (those removals, allowed, and `forward_authorization`, `protect_metrics`,
`allowed_worker_networks` loosened) logs a WARNING per change and lists it under
`security_weakened` in its answer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import attrs
import trio

from dsrouter.auth import Auth
from dsrouter.config import Config, ConfigError, LoadedConfig
from dsrouter.context import RouterContext
from dsrouter.control import PoolControl
from dsrouter.frontend import Frontend
from dsrouter.launcher import LaunchError, Pool, RayPool, Reconfiguration
from dsrouter.notify import Notifier, describe_pool
from dsrouter.policies import make_policy
from dsrouter.traced import traced
from dsrouter.workers_http import fan_out

log = logging.getLogger("dsrouter.reload")

RESTART_ONLY = (
    "server.host",
    "server.port",
    "server.metrics_port",
    "server.keep_alive_timeout_s",
    "server.max_header_kb",
    "logging.format",
    "realtime.max_message_mb",
    "tracing",
)
"""Also `tracing`: the exporter, its thread and the sampler are built once, at start-up."""


class Reloader:
    def __init__(
        self,
        context: RouterContext,
        frontend: Frontend,
        loader: Callable[[], LoadedConfig],
        notifier: Notifier | None = None,
        control: PoolControl | None = None,
    ) -> None:
        self.context = context
        self.frontend = frontend
        self.loader = loader
        self.notifier = notifier or Notifier({})
        self.control = control
        self.pool: Pool | RayPool | None = None
        """The launched workers, once `run_pool` has brought them up (the daemon sets it)."""
        self._lock = trio.Lock()

    async def reload(self) -> tuple[bool, dict[str, Any]]:
        """Apply the re-read configuration, bracketed by RELOADING=1 ... READY=1 for systemd.

        Reloads run one at a time (a SIGHUP and `POST /admin/reload` may overlap) and are
        shielded: a client that hangs up must not leave a half-applied worker list. Each
        step is bounded (the probes of new workers by `health.timeout_s`).
        """
        with trio.CancelScope(shield=True):
            async with self._lock:
                with self.notifier.reloading(
                    lambda: describe_pool(self.context.registry.summary())
                ):
                    return await self._reload()

    async def _reload(self) -> tuple[bool, dict[str, Any]]:
        old = self.context.config
        try:
            loaded = self.loader()
            refused, weakened = security_changes(old, loaded)
            if refused:
                raise ConfigError(refused)
            new = loaded.config
            auth = Auth(new.security, new.tenants)
            launcher = None if self.pool is None else await self.pool.reconfigure(new.launcher)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload rejected: %s", problem)
            return False, {"status": "rejected", "errors": exc.problems}
        except LaunchError as exc:
            problems = [f"launcher: {line}" for line in str(exc).splitlines()]
            for problem in problems:
                log.error("reload rejected: %s", problem)
            return False, {"status": "rejected", "errors": problems}
        registry = self.context.registry
        self.context.config = new
        self.frontend.auth = auth
        registry.reconfigure(
            new.health,
            new.routing,
            new.cost.default_seconds_per_unit,
            traced(make_policy(new.routing.algorithm))
            if new.routing.algorithm != old.routing.algorithm
            else None,
        )
        self.context.health.config = new.health
        wanted = {w.url: w for w in new.workers}
        added, removed = [], []
        for url, static in wanted.items():
            _, created = registry.add(url, api_key=static.api_key, source="config")
            if created:
                added.append(url)
        # Probe the new workers before the old ones go, so that replacing the whole worker
        # list never leaves a moment with nowhere to route (each probe is time-bounded).
        await fan_out(added, self.context.health.probe_now, 2 * new.health.timeout_s)
        for worker in registry.workers():
            if worker.source == "config" and worker.url not in wanted:
                registry.remove(worker.url)
                removed.append(worker.url)
        restart = [key for key in RESTART_ONLY if _get(old, key) != _get(new, key)]
        launcher_restart, rolling = self._apply_launcher(launcher, old, new)
        if rolling and old.launcher.model != new.launcher.model and self.control is not None:
            # The restarted workers load the new model; a catch-up must not load the old
            # model's refits back onto them.
            self.control.new_lineage(
                f"reload: launcher.model {old.launcher.model!r} -> {new.launcher.model!r}"
            )
        restart += launcher_restart
        for key in restart:
            log.warning("reload: %s changed; it takes effect after a restart", key)
        for change in weakened:
            log.warning("reload weakens security: %s", change)
        log.info("config reloaded: %d workers added, %d removed", len(added), len(removed))
        return True, {
            "status": "reloaded",
            "workers_added": added,
            "workers_removed": removed,
            "needs_restart": restart,
            "rolling_restart": rolling,
            "security_weakened": weakened,
        }

    def _apply_launcher(
        self, launcher: Reconfiguration | None, old: Config, new: Config
    ) -> tuple[list[str], list[int]]:
        """Hand the new `[launcher]` to the pool: the launcher keys that need a restart, and
        the indices of the workers the roll will restart.

        Without a running pool (none was configured, or it is still starting), any change
        needs a restart.
        """
        if self.pool is None or launcher is None:
            return ["launcher"] if old.launcher != new.launcher else [], []
        return list(launcher.restart_only), self.pool.apply(launcher, new.server.drain_timeout_s)


def security_changes(old: Config, loaded: LoadedConfig) -> tuple[list[str], list[str]]:
    """What a reload from `old` to `loaded` must refuse, and how it weakens security.

    Removing the admin token, every API key or every static worker is refused (first list,
    one line per problem naming the file and key) unless the new file sets that key
    itself; `loaded.given` tells a key written as empty from one that is missing. The
    second list says, one line per change, how the reload lowers the guard when applied.
    """
    new, given, source = loaded.config, loaded.given, loaded.source
    refused: list[str] = []
    weakened: list[str] = []

    def removal(key: str, removed: bool, what: str, empty: str, effect: str) -> None:
        if not removed:
            return
        if key in given:
            if key.startswith("security."):
                weakened.append(f"{key}: removed: {effect}")
        else:
            refused.append(
                f"{source}: {key}: missing; applying this file would remove {what} and then "
                f"{effect}. Refused, since a file cut short looks the same: write {empty} "
                "to remove it on purpose"
            )

    security, new_security = old.security, new.security
    removal(
        "security.admin_token",
        bool(security.admin_token and not new_security.admin_token),
        "the admin token",
        'admin_token = "" under [security]',
        "worker management, RL control and reload are open to anyone",
    )
    removal(
        "security.api_keys",
        bool(security.api_keys and not new_security.api_keys),
        "every API key",
        "api_keys = [] under [security]",
        "inference is open to anyone",
    )
    removal(
        "security.keys",
        bool(security.keys and not new_security.keys),
        "every [[security.keys]] entry",
        "keys = [] under [security]",
        "their tenants' classes and limits no longer apply"
        + ("" if new_security.api_keys else " and inference is open to anyone"),
    )
    removal(
        "workers",
        bool(old.workers and not new.workers),
        f"all {len(old.workers)} static worker(s)",
        "workers = [] (above the first table)",
        "only workers registered through the API or launched remain",
    )
    if new_security.forward_authorization and not security.forward_authorization:
        weakened.append(
            "security.forward_authorization: now true: clients' Authorization headers "
            "are passed on to the workers"
        )
    if security.protect_metrics and not new_security.protect_metrics:
        weakened.append("security.protect_metrics: now false: /metrics needs no token")
    networks, new_networks = security.allowed_worker_networks, new_security.allowed_worker_networks
    if networks and not new_networks:
        weakened.append(
            "security.allowed_worker_networks: removed: workers may be registered on any "
            "address but cloud metadata and link-local ones"
        )
    elif networks and (wider := [n for n in new_networks if n not in networks]):
        weakened.append(f"security.allowed_worker_networks: widened by {', '.join(wider)}")
    return refused, weakened


def _get(config: Config, key: str) -> Any:
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return attrs.asdict(value) if attrs.has(type(value)) else value
