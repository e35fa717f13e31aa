"""Local worker processes, each supervised by a child task of the root nursery.

    run_pool                       plan, clean up after a SIGKILLed predecessor, reserve ports
      progress                     log lines and the live summary (progress.py)
      Supervisor.run  x N          one per worker, for the router's whole life:
        spawn -> wait for /health 200 -> register -> wait for exit (or end a worker that
              reports itself failed) -> deregister -> restart per policy (restarts.py) or
              settle as failed / stopped
      Pool._roll                   while a reload's rolling restart runs (rolling.py)

`run_pool` reports itself started once every worker answered `/health` with 200 for the
first time. Any failure before that (see `errors.py`) stops every child and raises
`LaunchError`: a pool that never came up is a configuration problem, not something to
retry. After that, a worker that exits is restarted per `launcher.restart`, and one that
exhausts its restarts stays `failed` while the others keep serving.

Registration: a worker is in the registry only while its process has passed readiness and
is running. A worker still loading would otherwise be a target of RL broadcasts (which go to
every worker that is not dead), and one that exited must not keep its job ids. The launcher
talks to the registry only through its synchronous methods (its single-owner rule). Every
slot, registered or not, is visible through `Supervisor.slot` (`Pool.managed_workers`, shown
by `GET /workers` as `managed_workers`).

Replacement: `Supervisor.replace` stops the worker and starts it with another plan, at once
and without counting a restart; if the new plan does not come up, the worker goes straight
back to its previous one. It is the only way a supervisor's plan changes (rolling.py calls it).

Shutdown: cancelling `run_pool` stops every worker in parallel, each in a shielded scope:
SIGTERM to its process group, SIGKILL after `stop_timeout_s` (process.py).
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from dsrouter.config import LauncherConfig, mask_argv
from dsrouter.launcher.errors import LaunchError
from dsrouter.launcher.logs import WorkerOutput
from dsrouter.launcher.pidfile import TOKEN_VAR, PidFile, clean_stale, open_pidfile, runtime_dir
from dsrouter.launcher.plan import WorkerPlan, plan_pool, with_free_ports
from dsrouter.launcher.ports import check_ports_free
from dsrouter.launcher.process import Child, describe_exit, spawn
from dsrouter.launcher.progress import Progress
from dsrouter.launcher.restarts import RestartTracker
from dsrouter.launcher.rolling import Pool
from dsrouter.launcher.startup import StartFailed, no_restart_metrics, start_all
from dsrouter.registry import Health, ProbeOutcome, Registry
from dsrouter.units import MiB
from dsrouter.urls import display_id_for, worker_id_for
from dsrouter.workers_http import HealthReading, WorkerHTTP

log = logging.getLogger("dsrouter.launcher")

POLL_INTERVAL_S = 0.25
"""How often a starting worker's `/health` is polled."""
PROBE_TIMEOUT_S = 5.0
PUMP_GRACE_S = 2.0
"""How long output is still read after a worker's group is gone (a descendant that left the
group may hold the pipe open forever)."""


@attrs.define
class _Verdict:
    """Why the supervisor ended a running worker itself (None: it exited on its own)."""

    reason: str | None = None
    replaced: bool = False
    """Stopped for `Supervisor.replace`: start the new plan at once, no restart policy."""


@attrs.frozen
class RunResult:
    """How one run of a worker process ended."""

    failed: bool
    reason: str
    replaced: bool = False


@attrs.define(eq=False)
class Replacement:
    """One `Supervisor.replace` request; `done` fires when its outcome is known."""

    plan: WorkerPlan
    done: trio.Event = attrs.Factory(trio.Event)
    problem: str | None = None
    """None: the new process is ready and registered; else why it is not."""

    def finish(self, problem: str | None) -> None:
        if not self.done.is_set():
            self.problem = problem
            self.done.set()


class Supervisor:
    """Owns one worker: its process, its registration, its restarts and its state."""

    def __init__(
        self,
        plan: WorkerPlan,
        cfg: LauncherConfig,
        registry: Registry,
        progress: Progress,
        output: WorkerOutput,
        pidfile: PidFile,
        workers: WorkerHTTP,
        on_restart: Callable[[str], None],
    ) -> None:
        self.plan = plan
        self.cfg = cfg
        self.registry = registry
        self.progress = progress
        self.output = output
        self.pidfile = pidfile
        self.workers = workers
        self.on_restart = on_restart
        self.restarts = RestartTracker(cfg)
        self.pid: int | None = None
        """The running process; None between runs (backoff) and once settled."""
        self.last_exit: str | None = None
        self.settled = False
        """True once `run` returned: the worker is failed or stopped for good."""
        self._registered = False
        self._requested: Replacement | None = None
        """A replacement not applied yet; `_wake` is set while there is one."""
        self._wake = trio.Event()
        self._trial: tuple[Replacement, WorkerPlan] | None = None
        """The replacement the current run is trying, and the plan to go back to."""

    @property
    def index(self) -> int:
        return self.plan.index

    @property
    def state(self) -> str:
        return self.progress.states[self.index]

    def info(self) -> dict[str, Any]:
        """What `/workers` shows as `supervisor` for this worker while it is registered."""
        return {
            "index": self.index,
            "pid": self.pid,
            "restarts": self.restarts.total,
            "state": self.state,
            "log_file": None if self.output.path is None else str(self.output.path),
            "gpus": list(self.plan.gpus),
            "last_exit": self.last_exit,
        }

    def slot(self) -> dict[str, Any]:
        """What `/workers` shows under `managed_workers`, in every state.

        The registry holds a worker only while it is ready, so a slot that is starting, in
        backoff, failed or stopped is visible only here. Read live, never cached: `detail`
        says what a worker in progress waits for, or why it failed.
        """
        return {
            **self.info(),
            "url": self.plan.url,
            "worker_id": worker_id_for(self.plan.url),
            "detail": self.progress.details[self.index],
            "registered": self._registered,
        }

    def configure(self, cfg: LauncherConfig) -> None:
        """Adopt settings that apply without a restart (timeouts, the restart policy)."""
        self.cfg = cfg
        self.restarts.cfg = cfg

    async def replace(self, plan: WorkerPlan) -> str | None:
        """Stop the worker (SIGTERM, SIGKILL after `stop_timeout_s`) and start it with `plan`.

        Returns None once the new process is ready and registered; otherwise why not (its
        first start failed, and the worker went straight back to its previous plan, or the
        supervisor settled). One request at a time: the pool's roll task is the only caller.
        """
        if self.settled:
            return f"it is {self.state}, not running"
        assert self._requested is None and self._trial is None, "one replacement at a time"
        request = self._requested = Replacement(plan)
        self._wake.set()
        await request.done.wait()
        return request.problem

    def _apply_requested(self) -> None:
        """Switch to a requested plan before the next start; `run` switches back if it does
        not come up. Nothing else changes `plan`."""
        request, self._requested = self._requested, None
        if request is not None:
            self._wake = trio.Event()
            self._trial = (request, self.plan)
            self.plan = request.plan

    def _set_state(self, state: str, detail: str = "") -> None:
        self.progress.set_state(self.index, state, detail)
        if self._registered:
            self.registry.update_managed(self.plan.url, self.info())

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the worker, then keep it running; reports started at its first readiness.

        Raises `StartFailed` if the first start fails; later failures go to the restart
        policy. Returns when the worker settles as failed or stopped.
        """
        first = True

        def on_ready() -> None:
            nonlocal first
            if first:
                first = False
                task_status.started()
            if self._trial is not None:
                self._trial[0].finish(None)
                self._trial = None

        try:
            while True:
                self._apply_requested()
                result = await self._run_once(on_ready)
                self.last_exit = result.reason
                if first:
                    raise StartFailed(
                        f"worker {self.index} ({self.plan.url}) "
                        f"{result.reason}; {self.output.describe_tail()}"
                    )
                if self._trial is not None:
                    request, self.plan = self._trial
                    self._trial = None
                    log.warning(
                        "worker %d did not come up with its new settings (%s); "
                        "starting it again with its previous ones: %s",
                        self.index,
                        result.reason,
                        self.output.describe_tail(),
                    )
                    request.finish(result.reason)
                    continue
                if result.replaced:
                    continue
                decision = self.restarts.decide(trio.current_time(), result.failed)
                if not decision.restart:
                    self._set_state(
                        "failed" if result.failed else "stopped",
                        f"{result.reason}; {decision.reason}",
                    )
                    if result.failed:
                        log.warning("worker %d: %s", self.index, self.output.describe_tail())
                    return
                self.on_restart(display_id_for(self.plan.url))
                self._set_state(
                    "backoff",
                    f"{result.reason}; restart {self.restarts.total} in {decision.delay_s:g} s",
                )
                with trio.move_on_after(decision.delay_s):
                    await self._wake.wait()  # a replacement starts at once
        finally:
            self.settled = True
            for pending in (self._requested, self._trial and self._trial[0]):
                if pending:
                    pending.finish(f"its supervisor stopped ({self.state})")

    async def _run_once(self, on_ready: Callable[[], None]) -> RunResult:
        """One process from spawn to exit: ready, registered while running, then removed."""
        plan = self.plan
        self.output.begin_run(f"starting worker {self.index}: {shlex.join(mask_argv(plan.argv))}")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **plan.env, TOKEN_VAR: self.pidfile.token}
        try:
            child = spawn(plan.argv, env)
        except OSError as exc:
            return RunResult(True, f"could not be started: {plan.argv[0]}: {exc.strerror or exc}")
        self.pid = child.pid
        self.pidfile.set_group(self.index, child.pid)
        self._set_state("starting", f"pid {child.pid}")
        verdict = _Verdict()
        async with trio.open_nursery() as nursery:
            pump_scope = trio.CancelScope(shield=True)
            nursery.start_soon(self._pump, child, pump_scope)
            replace_scope = trio.CancelScope()
            nursery.start_soon(self._end_if_replaced, child, verdict, replace_scope)
            try:
                problem = await self._wait_ready(child)
                if problem is not None:
                    await child.stop(self.cfg.stop_timeout_s)
                    return _result(verdict, True, problem)
                self._register()
                on_ready()
                async with trio.open_nursery() as watch:
                    watch.start_soon(self._end_if_reported_failed, child, verdict)
                    code = await child.wait()
                    watch.cancel_scope.cancel()
                return _result(verdict, code != 0, describe_exit(code))
            finally:
                replace_scope.cancel()
                with trio.CancelScope(shield=True):
                    if child.returncode is None:
                        await self._stop(child)
                    self._deregister()
                    self.pid = None
                    self.pidfile.set_group(self.index, None)
                    pump_scope.deadline = trio.current_time() + PUMP_GRACE_S

    async def _end_if_reported_failed(self, child: Child, verdict: _Verdict) -> None:
        """Stop a running worker that reports itself failed, so the restart policy applies.

        A worker whose GPU process died answers `/health` with 503 and an error and never
        recovers or exits by itself (WORKER_API.md §2). The health checker marks it dead;
        then this confirms the failed state with a probe of its own (a worker that is only
        slow or unreachable is left to the health checker) and SIGTERMs the group, SIGKILL
        after `stop_timeout_s`. The exit is then handled like any other.
        """
        while True:
            changed = self.registry.changed
            worker = self.registry.by_url(self.plan.url)
            if (
                worker is not None
                and worker.health is Health.DEAD
                and not worker.quarantined_by_operator
            ):
                error = await self._reported_failure()
                if error is not None:
                    verdict.reason = f"reported itself failed: {error}"
                    self.progress.set_detail(self.index, verdict.reason)
                    log.warning("worker %d %s; stopping it", self.index, verdict.reason)
                    child.kill_group(signal.SIGTERM)
                    await trio.sleep(self.cfg.stop_timeout_s)
                    child.kill_group(signal.SIGKILL)
                    return
                await trio.sleep(PROBE_TIMEOUT_S)  # do not re-probe on every registry change
            await changed.wait()

    async def _end_if_replaced(
        self, child: Child, verdict: _Verdict, scope: trio.CancelScope
    ) -> None:
        """Stop the worker, starting or running, once `replace` asks for another plan."""
        with scope:
            await self._wake.wait()
            verdict.replaced = True
            self.progress.set_detail(self.index, "stopping for a rolling restart")
            child.kill_group(signal.SIGTERM)
            await trio.sleep(self.cfg.stop_timeout_s)
            log.warning(
                "worker %d: pid %d did not stop within stop_timeout_s = %g s of SIGTERM: SIGKILL",
                self.index,
                child.pid,
                self.cfg.stop_timeout_s,
            )
            child.kill_group(signal.SIGKILL)

    async def _reported_failure(self) -> str | None:
        """The worker's own error if `/health` answers 503 `{"status": "unhealthy", ...}`."""
        return (await self._probe()).reported_error

    async def _probe(self) -> HealthReading:
        return await self.workers.probe(self.plan.url, api_key="", timeout_s=PROBE_TIMEOUT_S)

    async def _stop(self, child: Child) -> None:
        """The router is stopping (this task was cancelled): SIGTERM, then SIGKILL."""
        started = trio.current_time()
        code = await child.stop(self.cfg.stop_timeout_s)
        self.last_exit = describe_exit(code)
        self._set_state(
            "stopped",
            f"stopped by the router: {self.last_exit} after {trio.current_time() - started:.1f} s",
        )

    async def _pump(self, child: Child, scope: trio.CancelScope) -> None:
        with scope:
            await self.output.pump(child.output)
        child.output.close()

    async def _wait_ready(self, child: Child) -> str | None:
        """None once `/health` answers 200; otherwise why the worker will not be ready."""
        problem: str | None = None
        async with trio.open_nursery() as race:

            async def watch_exit() -> None:
                nonlocal problem
                code = await child.wait()
                problem = f"exited during start-up ({describe_exit(code)})"
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

    async def _poll_health(self) -> str | None:
        """Return None when `GET /health` answers 200, or the worker's own error when it
        reports itself failed; keep the progress detail current meanwhile.

        A failed worker (503 `{"status": "unhealthy", ...}`, e.g. its scheduler died while
        warming up) never becomes ready nor exits by itself (WORKER_API.md section 2), so
        waiting for it would only delay the verdict by `wait_timeout_s`.
        """
        port = self.plan.ports.http
        while True:
            reading = await self._probe()
            if reading.outcome is ProbeOutcome.OK:
                return None
            if reading.reported_error is not None:
                return f"reported itself failed during start-up: {reading.reported_error}"
            if reading.outcome is ProbeOutcome.REFUSED:
                self.progress.set_detail(self.index, f"waiting for port {port}")
            elif reading.outcome is ProbeOutcome.WARMING:
                self.progress.set_detail(self.index, "warming up")
            else:
                self.progress.set_detail(self.index, reading.detail or "not ready")
            await trio.sleep(POLL_INTERVAL_S)

    def _register(self) -> None:
        self.progress.set_state(self.index, "ready", f"pid {self.pid}, {self.plan.url}")
        worker, new = self.registry.add(self.plan.url, managed=self.info())
        if not new:
            self.registry.update_managed(self.plan.url, self.info())
        self._registered = True
        # The readiness check just saw /health 200: route to it without waiting for a round.
        self.registry.apply_probe(worker.url, ProbeOutcome.OK)

    def _deregister(self) -> None:
        if self._registered:
            self._registered = False
            self.registry.remove(self.plan.url)


def _result(verdict: _Verdict, failed: bool, reason: str) -> RunResult:
    """How a run ended, given why (if at all) the supervisor ended it itself."""
    if verdict.replaced:
        return RunResult(False, f"stopped for a rolling restart ({reason})", replaced=True)
    if verdict.reason is not None:
        return RunResult(True, f"{verdict.reason} ({reason})")
    return RunResult(failed, reason)


def _not_shown(pool: Pool) -> None:
    """Nobody shows the pool while it starts (tests)."""


async def run_pool(
    cfg: LauncherConfig,
    registry: Registry,
    on_restart: Callable[[str], None] = no_restart_metrics,
    workers: WorkerHTTP | None = None,
    show: Callable[[Pool], None] = _not_shown,
    task_status: trio.TaskStatus[Pool | None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Launch and supervise `cfg.num_workers` workers until cancelled.

    Raises `LaunchError` (with every child stopped) if the pool cannot come up; reports
    started once every worker is ready and registered, with the `Pool` a reload changes
    (None when `num_workers` is 0). `show` gets the same `Pool` as soon as its workers
    are spawned, so their slots can be read while they start (a reload gets the pool only
    once it has started). `on_restart` is called with the worker's id for every restart
    (the `dsrouter_launcher_restarts` counter). `workers` is the router's worker-facing
    layer (its credentials); by default readiness checks go without any.
    """
    workers = workers or WorkerHTTP(connect_timeout_s=PROBE_TIMEOUT_S)
    if not cfg.num_workers:
        task_status.started(None)
        return
    plans = await plan_pool(cfg, os.environ)
    directory = runtime_dir()
    await clean_stale(directory)
    if cfg.scan_ports:
        plans = with_free_ports(cfg, plans)
    check_ports_free([plan.ports for plan in plans], cfg.worker_host)
    log_dir = Path(cfg.log_dir) if cfg.log_dir else None
    outputs = [
        WorkerOutput(plan.index, log_dir, cfg.log_max_mb * MiB, cfg.log_prefix) for plan in plans
    ]
    progress = Progress(
        len(plans),
        last_output=lambda index: outputs[index].tail[-1] if outputs[index].tail else None,
    )
    pidfile = open_pidfile(directory)
    failures: list[str] = []
    log.info("launching %d worker(s): %s", len(plans), shlex.join(mask_argv(plans[0].argv)))
    try:
        async with trio.open_nursery() as pool:
            pool.start_soon(progress.run)
            supervisors = [
                Supervisor(plan, cfg, registry, progress, output, pidfile, workers, on_restart)
                for plan, output in zip(plans, outputs, strict=True)
            ]
            handle = Pool(cfg, supervisors, registry, pool)
            show(handle)
            failures = await start_all(pool, [supervisor.run for supervisor in supervisors])
            if not failures:
                log.info("all %d worker(s) ready", len(plans))
                task_status.started(handle)
    finally:
        pidfile.remove()
        for output in outputs:
            output.close()
    if failures:
        raise LaunchError("\n".join(failures))
