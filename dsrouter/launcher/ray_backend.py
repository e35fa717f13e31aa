"""Workers on a Ray cluster (`[launcher] backend = "ray"`), supervised like local ones.

    run_ray_pool                   connect (or start a local cluster), one slot per worker
      progress                     log lines and the live summary (progress.py)
      RaySlot.run  x N             one per slot, for the router's whole life:
        placement group "<namespace>-worker-<i>" (one bundle: 1 CPU + its GPUs), ready
        -> actor "worker-<i>" (detached, named, in that bundle; `ray_actor.WorkerHost`),
           found by name if it is alive
        -> its server started, or adopted if it already runs with these settings (a
           restarted router re-attaching; a server with other settings is restarted)
        -> wait for /health 200 -> register at http://<node ip>:<port>
        -> wait for the server's exit or the actor's death (or stop a server that reports
           itself failed)
        -> deregister -> restart per policy (restarts.py) or settle as failed / stopped

Each slot is its own placement group, so Ray moves it alone: when a node is lost, the
actors there die, Ray re-places their bundles on nodes with room, and the slot's next run
creates a new actor there (its start-up waits for the bundle, as long as it takes). A
server that exits is restarted by the same actor, on the same ports; an actor that died is
replaced (new ports, new URL). Restarts of either kind count against `launcher.restart`.

Ray calls never block the trio thread: an `ObjectRef` is awaited through its future
(`_get`), and the few synchronous calls (connect, create, kill) run in `trio.to_thread`.

`run_ray_pool` reports itself started once every slot answered `/health` with 200 for the
first time; a slot that cannot start (placement, actor or readiness within
`wait_timeout_s`) fails the launch with `LaunchError`, after the stop below.

Stopping (the task is cancelled: the daemon has drained and closed its connections), all
slots at once, each in this order: deregister -> stop the server (its keeper: SIGTERM, then
SIGKILL after `stop_timeout_s`) -> kill the actor -> remove the placement group. With
`launcher.ray.detach` the slots only deregister: the next router with the same namespace
finds the actors by name and re-attaches to the running servers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
from typing import Any

import attrs
import trio

from dsrouter.config import LauncherConfig
from dsrouter.launcher.errors import LaunchError
from dsrouter.launcher.local import POLL_INTERVAL_S, PROBE_TIMEOUT_S, RunResult
from dsrouter.launcher.progress import Progress
from dsrouter.launcher.ray_actor import KILL_GRACE_S, WorkerHost
from dsrouter.launcher.restarts import RestartTracker
from dsrouter.launcher.rolling import IN_PLACE, Reconfiguration
from dsrouter.launcher.startup import StartFailed, no_restart_metrics, start_all
from dsrouter.registry import Health, ProbeOutcome, Registry
from dsrouter.urls import display_id_for, normalize_worker_url, worker_id_for
from dsrouter.workers_http import WorkerHTTP

log = logging.getLogger("dsrouter.launcher")

EXIT_POLL_S = 30.0
"""How long one `wait_exit` call blocks in the actor (a death ends it at once)."""
EXITED = "exited during start-up"
RPC_TIMEOUT_S = 60.0
"""Bound on connecting to Ray and on a call that should answer at once (the output tail)."""
STOP_STEP_S = 15.0
"""Bound on each Ray call while stopping (beyond the server's own stop timeout)."""


def _import_ray() -> Any:
    """Ray, with its C++ failure-signal handler off in the router (read when ray is first
    imported): it prints a stack dump for every SIGTERM, and a SIGTERM is how the router is
    asked to stop. The environment may set `RAY_DISABLE_FAILURE_SIGNAL_HANDLER` otherwise."""
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        import ray
    except ImportError:
        raise LaunchError(
            "launcher.backend = 'ray' needs Ray on the router's host: pip install 'dsrouter[ray]'"
        ) from None
    return ray


async def _get(ref: Any) -> Any:
    """The value of a Ray `ObjectRef`, awaited without holding a thread.

    Raises what `ray.get` raises (`RayActorError` when the actor died meanwhile).
    """
    future = ref.future()
    done = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def wake(_: object) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(done.set)

    future.add_done_callback(wake)
    await done.wait()
    return future.result()


@attrs.frozen
class Names:
    """What the router calls things on the cluster; the namespace keeps routers apart."""

    namespace: str

    def actor(self, index: int) -> str:
        return f"worker-{index}"

    def group(self, index: int) -> str:
        return f"{self.namespace}-worker-{index}"


class RaySlot:
    """Owns one slot: its placement group, its actor, its server's registration, restarts."""

    def __init__(
        self,
        index: int,
        cfg: LauncherConfig,
        ray: Any,
        registry: Registry,
        progress: Progress,
        workers: WorkerHTTP,
        on_restart: Callable[[str], None],
    ) -> None:
        self.index = index
        self.cfg = cfg
        self.ray = ray
        self.names = Names(cfg.ray.namespace)
        self.registry = registry
        self.progress = progress
        self.workers = workers
        self.on_restart = on_restart
        self.restarts = RestartTracker(cfg)
        self.group: Any = None
        self.actor: Any = None
        self.where: dict[str, Any] = {}
        """The actor's last `describe()`: node, URL, pids."""
        self.url: str | None = None
        self.last_exit: str | None = None
        self.settled = False
        self._registered = False

    @property
    def state(self) -> str:
        return self.progress.states[self.index]

    def info(self) -> dict[str, Any]:
        """What `/workers` shows as `supervisor` for this worker while it is registered."""
        where = self.where
        return {
            "index": self.index,
            "pid": where.get("pid"),
            "restarts": self.restarts.total,
            "state": self.state,
            "log_file": where.get("log_file"),
            "gpus": where.get("gpus", []),
            "last_exit": self.last_exit,
            "node": where.get("node_ip"),
            "node_id": where.get("node_id"),
            "actor": f"{self.names.namespace}/{self.names.actor(self.index)}",
            "actor_pid": where.get("actor_pid"),
            "keeper_pid": where.get("keeper_pid"),
        }

    def _label(self) -> str:
        """The `worker` label of this slot's restarts: its address once known."""
        return display_id_for(self.url) if self.url is not None else f"ray-slot-{self.index}"

    def slot(self) -> dict[str, Any]:
        """What `/workers` shows under `managed_workers`, in every state (live)."""
        return {
            **self.info(),
            "url": self.url,
            "worker_id": None if self.url is None else worker_id_for(self.url),
            "detail": self.progress.details[self.index],
            "registered": self._registered,
        }

    def configure(self, cfg: LauncherConfig) -> None:
        """Adopt settings that apply without a restart (timeouts, the restart policy)."""
        self.cfg = cfg
        self.restarts.cfg = cfg

    def _set_state(self, state: str, detail: str = "") -> None:
        self.progress.set_state(self.index, state, detail)
        if self._registered and self.url is not None:
            self.registry.update_managed(self.url, self.info())

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep the slot's worker running; reports started at its first readiness.

        Raises `StartFailed` if the first start fails; later failures go to the restart
        policy. Returns when the slot settles as failed or stopped.
        """
        first = True

        def on_ready() -> None:
            nonlocal first
            if first:
                first = False
                task_status.started()

        try:
            while True:
                with trio.fail_after(self.cfg.wait_timeout_s if first else math.inf):
                    problem = await self._place()
                if problem is None:
                    result = await self._run_once(on_ready)
                else:
                    result = RunResult(True, problem)
                self.last_exit = result.reason
                if first:
                    tail = await self._tail()
                    raise StartFailed(f"worker {self.index} ({self.url}) {result.reason}; {tail}")
                decision = self.restarts.decide(trio.current_time(), result.failed)
                if not decision.restart:
                    self._set_state(
                        "failed" if result.failed else "stopped",
                        f"{result.reason}; {decision.reason}",
                    )
                    return
                self.on_restart(self._label())
                self._set_state(
                    "backoff",
                    f"{result.reason}; restart {self.restarts.total} in {decision.delay_s:g} s",
                )
                await trio.sleep(decision.delay_s)
        except trio.TooSlowError:
            raise StartFailed(
                f"worker {self.index}: Ray did not place it within wait_timeout_s = "
                f"{self.cfg.wait_timeout_s:g} s (last: {self.progress.details[self.index]})"
            ) from None
        finally:
            self.settled = True

    async def _place(self) -> str | None:
        """The slot's placement group placed and its actor alive (found or created); None,
        or why the actor is not (it died, or its constructor failed)."""
        names = self.names
        index = self.index
        if self.group is None:
            self.group = await trio.to_thread.run_sync(self._find_or_create_group)
        self._set_state("starting", f"waiting for Ray to place {names.group(index)}")
        await _get(self.group.ready())
        if self.actor is None:
            self.progress.set_detail(index, f"starting actor {names.actor(index)}")
            self.actor = await trio.to_thread.run_sync(self._find_or_create_actor)
        try:
            self.where = await _get(self.actor.describe.remote())
        except self.ray.exceptions.RayActorError as exc:
            return self._actor_died(exc)
        self.url = normalize_worker_url(self.where["url"])
        return None

    def _find_or_create_group(self) -> Any:
        from ray.util.placement_group import get_placement_group, placement_group

        name = self.names.group(self.index)
        with contextlib.suppress(ValueError):
            return get_placement_group(name)
        bundle = {"CPU": 1.0}
        if self.cfg.num_gpus_per_worker:
            bundle["GPU"] = float(self.cfg.num_gpus_per_worker)
        return placement_group([bundle], name=name, lifetime="detached")

    def _find_or_create_actor(self) -> Any:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return (
            self.ray.remote(WorkerHost)
            .options(
                name=self.names.actor(self.index),
                namespace=self.names.namespace,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=0,
                max_concurrency=8,
                num_cpus=1,
                num_gpus=self.cfg.num_gpus_per_worker,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.group, placement_group_bundle_index=0
                ),
            )
            .remote(self.index, self.cfg.log_dir, self.cfg.log_max_mb)
        )

    async def _run_once(self, on_ready: Callable[[], None]) -> RunResult:
        """One server from start (or re-attach) to exit, registered while it is ready."""
        try:
            self.where = await _get(self.actor.start.remote(self.cfg))
            if self.where["adopted"]:
                log.info(
                    "worker %d: re-attached to actor %s on %s (pid %s)",
                    self.index,
                    self.names.actor(self.index),
                    self.where["node_ip"],
                    self.where["pid"],
                )
        except self.ray.exceptions.RayActorError as exc:
            return RunResult(True, self._actor_died(exc))
        except self.ray.exceptions.RayTaskError as exc:  # Python itself could not start
            return RunResult(True, f"could not be started: {_first_line(exc)}")
        run = self.where["run"]
        self._set_state("starting", f"pid {self.where['pid']} on {self.where['node_ip']}")
        try:
            problem = await self._wait_ready(run)
            if problem is not None:
                with trio.CancelScope(shield=True):
                    status = await self._stop_server()
                exited = problem.startswith(EXITED)
                return RunResult(True, problem if exited else f"{problem} ({status})")
            self._register()
            on_ready()
            verdict: list[str] = []
            async with trio.open_nursery() as watch:
                watch.start_soon(self._end_if_reported_failed, verdict)
                status = await self._wait_exit(run)
                watch.cancel_scope.cancel()
            if verdict:
                return RunResult(True, f"{verdict[0]} ({status})")
            return RunResult(status != "exit status 0", status)
        finally:
            self.deregister()
            self.where = {**self.where, "pid": None, "keeper_pid": None}

    async def _end_if_reported_failed(self, verdict: list[str]) -> None:
        """Stop a running server that reports itself failed, so the restart policy applies.

        As `local.Supervisor._end_if_reported_failed`: a worker whose GPU process died answers
        `/health` 503 with an error and never recovers nor exits (WORKER_API.md §2). Once the
        health checker marks it dead and a probe of our own reads that error, the actor
        stops the server; the exit is then handled like any other, reason in `verdict`.
        """
        assert self.url is not None
        while True:
            changed = self.registry.changed
            worker = self.registry.by_url(self.url)
            if (
                worker is not None
                and worker.health is Health.DEAD
                and not worker.quarantined_by_operator
            ):
                reading = await self.workers.probe(self.url, api_key="", timeout_s=PROBE_TIMEOUT_S)
                if reading.reported_error is not None:
                    verdict.append(f"reported itself failed: {reading.reported_error}")
                    self.progress.set_detail(self.index, verdict[0])
                    log.warning("worker %d %s; stopping it", self.index, verdict[0])
                    await self._stop_server()
                    return
                await trio.sleep(PROBE_TIMEOUT_S)  # do not re-probe on every registry change
            await changed.wait()

    def _actor_died(self, exc: BaseException) -> str:
        """Forget a dead actor (the next run creates another); why, for the operator."""
        self.actor = None
        return f"its actor died ({_first_line(exc)})"

    async def _wait_ready(self, run: int) -> str | None:
        """None once `/health` answers 200; otherwise why the worker will not be ready."""
        problem: str | None = None
        async with trio.open_nursery() as race:

            async def watch_exit() -> None:
                nonlocal problem
                problem = f"{EXITED} ({await self._wait_exit(run)})"
                race.cancel_scope.cancel()

            race.start_soon(watch_exit)
            with trio.move_on_after(self.cfg.wait_timeout_s) as timeout:
                problem = await self._poll_health()
            if timeout.cancelled_caught:
                problem = (
                    f"was not ready within wait_timeout_s = {self.cfg.wait_timeout_s:g} s "
                    f"(last: {self.progress.details[self.index]})"
                )
            race.cancel_scope.cancel()
        return problem

    async def _wait_exit(self, run: int) -> str:
        """How run number `run` ended: its exit status, or the death of its actor."""
        try:
            while True:
                status = await _get(self.actor.wait_exit.remote(run, EXIT_POLL_S))
                if status is not None:
                    return str(status)
        except self.ray.exceptions.RayActorError as exc:
            return self._actor_died(exc)

    async def _poll_health(self) -> str | None:
        """None when `GET /health` answers 200; the worker's own error if it reports one."""
        assert self.url is not None
        while True:
            reading = await self.workers.probe(self.url, api_key="", timeout_s=PROBE_TIMEOUT_S)
            if reading.outcome is ProbeOutcome.OK:
                return None
            if reading.reported_error is not None:
                return f"reported itself failed during start-up: {reading.reported_error}"
            if reading.outcome is ProbeOutcome.REFUSED:
                detail = f"waiting for {self.url} on node {self.where['node_ip']}"
            elif reading.outcome is ProbeOutcome.WARMING:
                detail = f"warming up on node {self.where['node_ip']}"
            else:
                detail = reading.detail or "not ready"
            self.progress.set_detail(self.index, detail)
            await trio.sleep(POLL_INTERVAL_S)

    async def _stop_server(self) -> str:
        """Ask the actor to end its server's group; how it ended."""
        if self.actor is None:
            return "its actor is gone"
        with trio.move_on_after(self.cfg.stop_timeout_s + KILL_GRACE_S + STOP_STEP_S):
            try:
                return str(await _get(self.actor.stop.remote(self.cfg.stop_timeout_s)))
            except self.ray.exceptions.RayActorError as exc:
                return self._actor_died(exc)
        return "its actor did not answer the stop request"

    async def _tail(self) -> str:
        """The last output lines of the slot's server, for a start-up failure message."""
        if self.actor is None:
            return "its actor is gone, see Ray's logs"
        with (
            trio.move_on_after(RPC_TIMEOUT_S),
            contextlib.suppress(self.ray.exceptions.RayActorError),
        ):
            lines = await _get(self.actor.output_tail.remote())
            return "last output:\n    " + "\n    ".join(lines) if lines else "no output"
        return "its output is in Ray's logs"

    def _register(self) -> None:
        assert self.url is not None
        self._set_state("ready", f"pid {self.where['pid']}, {self.url}")
        worker, new = self.registry.add(self.url, managed=self.info())
        if not new:
            self.registry.update_managed(self.url, self.info())
        self._registered = True
        self.registry.apply_probe(worker.url, ProbeOutcome.OK)

    def deregister(self) -> None:
        if self._registered and self.url is not None:
            self._registered = False
            self.registry.remove(self.url)

    async def stop_server(self) -> None:
        """The router stops (first step): end the server's group through the actor."""
        self.deregister()
        if self.actor is not None:
            status = await self._stop_server()
            self._set_state("stopped", f"stopped by the router: {status}")

    def kill_actor(self) -> None:
        """Second step (blocking, for a thread). By name when this router has no handle:
        a failed launch may have left an actor it never got one for."""
        actor, self.actor = self.actor, None
        if actor is None:
            try:
                actor = self.ray.get_actor(self.names.actor(self.index), self.names.namespace)
            except ValueError:
                return
        self.ray.kill(actor)

    def remove_group(self) -> None:
        """Last step (blocking, for a thread): give the bundle's resources back to Ray."""
        from ray.util.placement_group import remove_placement_group

        group, self.group = self.group, None
        if group is not None:
            remove_placement_group(group)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class RayPool:
    """The Ray pool as a reload sees it (`Pool`'s interface): timeouts and the restart policy
    apply in place; every other `[launcher]` change needs a router restart."""

    def __init__(self, cfg: LauncherConfig, slots: list[RaySlot], progress: Progress) -> None:
        self.cfg = cfg
        self._slots = slots
        self._progress = progress

    def managed_workers(self) -> list[dict[str, Any]]:
        return [slot.slot() for slot in self._slots]

    def progress_line(self) -> str:
        """The systemd STATUS during start-up, as for local workers."""
        return self._progress.summary()

    async def reconfigure(self, new: LauncherConfig) -> Reconfiguration:
        changed = [
            field.name
            for field in attrs.fields(LauncherConfig)
            if getattr(new, field.name) != getattr(self.cfg, field.name)
        ]
        cfg = attrs.evolve(self.cfg, **{key: getattr(new, key) for key in IN_PLACE})
        in_place = tuple(f"launcher.{key}" for key in changed if key in IN_PLACE)
        restart_only = tuple(f"launcher.{key}" for key in changed if key not in IN_PLACE)
        return Reconfiguration(cfg, (), in_place, restart_only)

    def apply(self, change: Reconfiguration, drain_timeout_s: float) -> list[int]:
        self.cfg = change.cfg
        for slot in self._slots:
            slot.configure(change.cfg)
        return []


def _connect(ray: Any, cfg: LauncherConfig) -> str:
    """Join the configured cluster, or start a local one; a line saying which.

    Runs in a thread on purpose: on the main thread `ray.init` replaces the SIGTERM handler
    with one that exits at once, which would skip the router's drain.
    """
    local = {} if cfg.ray.address else {"include_dashboard": False}
    ray.init(
        address=cfg.ray.address or None,
        namespace=cfg.ray.namespace,
        logging_level=logging.WARNING,
        log_to_driver=not cfg.log_dir,
        **local,
    )
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    gpus = ray.cluster_resources().get("GPU", 0)
    where = cfg.ray.address or "a local Ray cluster"
    return f"{where}: {len(nodes)} node(s), {gpus:g} GPU(s), namespace {cfg.ray.namespace!r}"


async def _stop(slots: list[RaySlot], detach: bool) -> None:
    """Stop the pool in the documented order, each step for every slot at once: servers,
    then actors, then placement groups. With `detach` only deregister."""
    if detach:
        for slot in slots:
            slot.deregister()
        log.info("launcher.ray.detach: leaving the actors and their servers running")
        return
    async with trio.open_nursery() as stopping:
        for slot in slots:
            stopping.start_soon(slot.stop_server)
    for step in (RaySlot.kill_actor, RaySlot.remove_group):
        async with trio.open_nursery() as stepping:
            for slot in slots:
                stepping.start_soon(_bounded, step, slot)
    log.info("Ray actors and placement groups released")


async def _bounded(call: Callable[..., object], *args: Any) -> None:
    """A blocking Ray call in a thread, given up on after `STOP_STEP_S`: a cluster whose
    raylet is gone (say, a local one stopped by the same signal) never answers, and the
    router must still exit."""
    with trio.move_on_after(STOP_STEP_S):
        await trio.to_thread.run_sync(call, *args, abandon_on_cancel=True)
        return
    log.warning("Ray did not answer %s within %g s; giving up on it", call.__name__, STOP_STEP_S)


def _not_shown(pool: RayPool) -> None:
    """Nobody shows the pool before it is up (tests)."""


async def run_ray_pool(
    cfg: LauncherConfig,
    registry: Registry,
    on_restart: Callable[[str], None] = no_restart_metrics,
    workers: WorkerHTTP | None = None,
    show: Callable[[RayPool], None] = _not_shown,
    task_status: trio.TaskStatus[RayPool | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """`run_pool` for `backend = "ray"`: the same contract, on a Ray cluster (`show` gets
    the pool as soon as its slots exist, for `/workers` and the start-up STATUS)."""
    workers = workers or WorkerHTTP(connect_timeout_s=PROBE_TIMEOUT_S)
    if not cfg.num_workers:
        task_status.started(None)
        return
    problems = []
    if not cfg.command:
        problems.append("launcher.command is empty")
    if not cfg.model:
        problems.append("launcher.model is empty: the workers need --model-path")
    if problems:
        raise LaunchError("\n".join(problems))
    ray = _import_ray()
    try:
        with trio.fail_after(RPC_TIMEOUT_S):
            joined = await trio.to_thread.run_sync(_connect, ray, cfg, abandon_on_cancel=True)
    except (ConnectionError, RuntimeError, trio.TooSlowError) as exc:
        why = f"no answer within {RPC_TIMEOUT_S:g} s" if isinstance(exc, trio.TooSlowError) else exc
        raise LaunchError(
            f"cannot connect to Ray at launcher.ray.address = {cfg.ray.address!r}: {why}"
        ) from None
    log.info("launching %d worker(s) on %s", cfg.num_workers, joined)
    progress = Progress(cfg.num_workers)
    slots = [
        RaySlot(i, cfg, ray, registry, progress, workers, on_restart)
        for i in range(cfg.num_workers)
    ]
    handle = RayPool(cfg, slots, progress)
    show(handle)
    failures: list[str] = []
    try:
        async with trio.open_nursery() as pool:
            pool.start_soon(progress.run)
            failures = await start_all(pool, [slot.run for slot in slots])
            if not failures:
                log.info("all %d worker(s) ready", cfg.num_workers)
                task_status.started(handle)
    finally:
        with trio.CancelScope(shield=True):
            await _stop(slots, detach=cfg.ray.detach and not failures)
            await _bounded(ray.shutdown)
    if failures:
        raise LaunchError("\n".join(failures))
