"""A changed `[launcher]` applied to the running pool: in place, by rolling restart, or later.

Every `LauncherConfig` key is in exactly one of three groups:

* `IN_PLACE`: restart policy and timeouts; each supervisor uses them from its next decision.
* `ROLLING`: what a worker runs (command, model, extra_args, env, GPUs). Workers whose plan
  (argv, env, GPUs) differs from the new one are restarted one at a time by the roll task.
* `RESTART_ONLY`: the pool's shape and addresses (a worker's URL is its identity in the
  registry), and where output goes. Reported by the reload; the running values stay until
  the router restarts. `num_workers` is one of them: a reload neither adds nor removes
  workers.

GPU settings roll only if no worker would be given a GPU that another worker holds now (two
models on one GPU can run it out of memory); otherwise they too wait for a restart.

The roll task (`Pool._roll`, a child of `run_pool`'s nursery, so cancelling the pool stops
it) restarts one worker at a time, in index order:

    drain        mark it draining (no new requests) and wait for its in-flight requests,
                 at most `server.drain_timeout_s`; if it is the only routable worker, the
                 registry is paused meanwhile, so requests wait in the router queue
    replace      its supervisor stops the process group and starts the new plan
                 (`Supervisor.replace`)
    caught up    wait until it is registered, its capabilities are read, and it is healthy
                 and on the pool's weight version (the registry's catch-up does that for
                 every new registration), at most `wait_timeout_s`

A worker an operator had drained is drained again once it is back.

If a worker does not come up with the new plan, its supervisor starts it again with the old
one and the roll stops there: the remaining workers keep their old settings and a later
reload tries again. There is only ever one roll. A reload during a roll retargets it: the
worker being restarted finishes with what it was given, then the roll continues towards the
newest settings (restarting again any worker that runs an older target).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio

from dsrouter.config import LauncherConfig
from dsrouter.launcher.plan import WorkerPlan, plan_pool
from dsrouter.registry import Health, Registry, Worker

if TYPE_CHECKING:
    from dsrouter.launcher.local import Supervisor

log = logging.getLogger("dsrouter.launcher")

IN_PLACE = (
    "wait_timeout_s",
    "restart",
    "max_restarts",
    "restart_window_s",
    "backoff_initial_s",
    "backoff_max_s",
    "stop_timeout_s",
)
ROLLING = ("model", "command", "extra_args", "env", "num_gpus_per_worker", "gpu_ids")
GPU_KEYS = ("num_gpus_per_worker", "gpu_ids")
RESTART_ONLY = (
    "backend",
    "num_workers",
    "worker_host",
    "worker_base_port",
    "port_stride",
    "master_port_base",
    "scheduler_port_base",
    "internal_port_stride",
    "scan_ports",
    "log_dir",
    "log_max_mb",
    "log_prefix",
    "ray",
)


@attrs.frozen
class Reconfiguration:
    """What a new `[launcher]` means for the running pool (see `Pool.reconfigure`)."""

    cfg: LauncherConfig
    """The settings the pool will run: the new ones, except the keys in `restart_only`."""
    plans: tuple[WorkerPlan, ...]
    in_place: tuple[str, ...] = ()
    restart_only: tuple[str, ...] = ()
    """Changed keys (`launcher.num_workers`, ...) that take effect after a restart."""


class Pool:
    """The running pool as a reload sees it: handed out by `run_pool` once it is up.

    `cfg` and `plans` are the target; a supervisor's plan differs from its target only until
    the roll task has restarted it.
    """

    def __init__(
        self,
        cfg: LauncherConfig,
        supervisors: Sequence[Supervisor],
        registry: Registry,
        nursery: trio.Nursery,
    ) -> None:
        self.cfg = cfg
        self.plans = tuple(s.plan for s in supervisors)
        self.drain_timeout_s = 30.0
        self._supervisors = supervisors
        self._registry = registry
        self._nursery = nursery
        self._rolling = False

    def managed_workers(self) -> list[dict[str, Any]]:
        """One entry per launcher slot, in index order, whatever its supervisor state.

        Read-only: what `GET /workers` shows as `managed_workers`. A worker that is starting,
        in backoff, failed or stopped is not in the registry, so this is the only place an
        operator sees it (with its last exit and log file).
        """
        return [supervisor.slot() for supervisor in self._supervisors]

    def progress_line(self) -> str:
        """`1/2 ready · 41 s · worker 1: warming up` (the systemd STATUS during start-up)."""
        return self._supervisors[0].progress.summary()

    async def reconfigure(self, new: LauncherConfig) -> Reconfiguration:
        """Plan `new` against the running pool; nothing changes until `apply`.

        Raises `LaunchError` if the new settings cannot run (a command not on PATH, too few
        GPUs), so the reload is rejected before anything restarts.
        """
        restart_only = tuple(
            f"launcher.{key}" for key in RESTART_ONLY if getattr(new, key) != getattr(self.cfg, key)
        )
        cfg = attrs.evolve(self.cfg, **{key: getattr(new, key) for key in (*IN_PLACE, *ROLLING)})
        if cfg == self.cfg:
            return Reconfiguration(self.cfg, self.plans, restart_only=restart_only)
        plans = await plan_pool(cfg, os.environ)
        taken = self._gpus_taken(plans)
        if taken:
            log.warning(
                "reload: the new GPU settings would move %s; they take effect after a restart",
                taken,
            )
            restart_only += tuple(
                f"launcher.{key}" for key in GPU_KEYS if getattr(cfg, key) != getattr(self.cfg, key)
            )
            cfg = attrs.evolve(cfg, **{key: getattr(self.cfg, key) for key in GPU_KEYS})
            plans = await plan_pool(cfg, os.environ)
        in_place = tuple(
            f"launcher.{key}" for key in IN_PLACE if getattr(cfg, key) != getattr(self.cfg, key)
        )
        return Reconfiguration(cfg, tuple(plans), in_place, restart_only)

    def _gpus_taken(self, plans: Sequence[WorkerPlan]) -> str:
        """GPUs the new plans would give a worker while another worker holds them now."""
        moves = []
        for new in plans:
            mine = set(self._supervisors[new.index].plan.gpus)
            for other in self._supervisors:
                if other.index != new.index:
                    clash = sorted(set(new.gpus) & set(other.plan.gpus) - mine)
                    if clash:
                        moves.append(
                            f"GPU {', '.join(clash)} of worker {other.index} to worker {new.index}"
                        )
        return "; ".join(moves)

    def apply(self, change: Reconfiguration, drain_timeout_s: float) -> list[int]:
        """Adopt `change`: in-place settings now, the rest by the roll task (started here
        unless one is running). Returns the indices of the workers the roll will restart."""
        self.cfg = change.cfg
        self.plans = change.plans
        self.drain_timeout_s = drain_timeout_s
        for supervisor in self._supervisors:
            supervisor.configure(change.cfg)
        for key in change.in_place:
            log.info("reload: %s applied to the running workers", key)
        pending = [s.index for s in self._supervisors if self._needs_restart(s)]
        skipped = [
            s.index for s in self._supervisors if s.settled and s.plan != self.plans[s.index]
        ]
        if skipped:
            log.warning(
                "reload: worker(s) %s are %s and keep their old settings until the router restarts",
                skipped,
                "/".join(sorted({self._supervisors[i].state for i in skipped})),
            )
        if pending and not self._rolling:
            self._rolling = True
            self._nursery.start_soon(self._roll)
        if pending:
            log.info("reload: rolling restart of worker(s) %s", pending)
        return pending

    def _needs_restart(self, supervisor: Supervisor) -> bool:
        return not supervisor.settled and supervisor.plan != self.plans[supervisor.index]

    async def _roll(self) -> None:
        try:
            while True:
                supervisor = next(filter(self._needs_restart, self._supervisors), None)
                if supervisor is None:
                    log.info("rolling restart done: every running worker has the new settings")
                    return
                problem = await self._restart(supervisor, self.plans[supervisor.index])
                if problem is not None:
                    left = [s.index for s in self._supervisors if self._needs_restart(s)]
                    log.error(
                        "rolling restart stopped at worker %d: %s. Worker(s) %s keep "
                        "their previous settings; fix router.toml and reload again",
                        supervisor.index,
                        problem,
                        left,
                    )
                    return
        finally:
            self._rolling = False

    async def _restart(self, supervisor: Supervisor, plan: WorkerPlan) -> str | None:
        """Drain, replace and wait for one worker; None on success, else what went wrong."""
        registry = self._registry
        index = supervisor.index
        worker = registry.by_url(plan.url)
        drained_by_operator = worker is not None and worker.draining
        with contextlib.ExitStack() as stack:
            if not any(w is not worker for w in registry.routable()):
                log.warning(
                    "rolling restart: worker %d is the only routable worker; requests "
                    "wait in the router queue while it restarts",
                    index,
                )
                stack.enter_context(registry.pause())
            if worker is not None and not drained_by_operator:
                stack.callback(self._undrain, worker)
                log.info(
                    "rolling restart: draining worker %d (%d in flight)", index, worker.in_flight
                )
                registry.set_draining(worker, True, remove_when_idle=False)
            if worker is not None:
                await self._drained(worker, index)
            log.info("rolling restart: restarting worker %d with the new settings", index)
            problem = await supervisor.replace(plan)
            if problem is not None:
                return f"it did not come up with the new settings ({problem})"
            back = registry.by_url(plan.url)
            if drained_by_operator and back is not None:
                registry.set_draining(back, True, remove_when_idle=False)
            problem = await self._caught_up(plan.url, supervisor.cfg.wait_timeout_s)
            if problem is None:
                log.info("rolling restart: worker %d is back (pid %s)", index, supervisor.pid)
            return problem

    def _undrain(self, worker: Worker) -> None:
        """A worker still registered after its step (it was not restarted) serves again."""
        if self._registry.by_url(worker.url) is worker and worker.draining:
            self._registry.set_draining(worker, False, remove_when_idle=False)

    async def _drained(self, worker: Worker, index: int) -> None:
        with trio.move_on_after(self.drain_timeout_s):
            while worker.in_flight:
                await self._registry.changed.wait()
            return
        log.warning(
            "rolling restart: worker %d still serves %d request(s) after "
            "server.drain_timeout_s = %g s; stopping it anyway",
            index,
            worker.in_flight,
            self.drain_timeout_s,
        )

    async def _caught_up(self, url: str, timeout_s: float) -> str | None:
        """None once the new registration's capabilities are known (routing by output type
        needs them) and it is healthy and on the pool's weights."""
        with trio.move_on_after(timeout_s):
            await self._registry.request_capability_refresh(url).wait()
            while True:
                worker = self._registry.by_url(url)
                if worker is None:
                    return "it exited right after becoming ready"
                if worker.health is Health.HEALTHY and not worker.stale:
                    return None
                await self._registry.changed.wait()
        return (
            f"it was not back in rotation (capabilities read, healthy, on the pool's "
            f"weights) within wait_timeout_s = {timeout_s:g} s"
        )
