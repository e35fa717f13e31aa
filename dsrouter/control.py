"""The RL control plane: refits as transactions, pool sleep/wake, and catch-up of workers.

The routers we succeed broadcast a refit, answer 200 whatever happened, and keep routing to
workers whose update failed. Here the pool's weights are a versioned state: a refit takes
the control lock, (by default) drains the pool, applies the update everywhere, records each
worker's confirmed version and makes every worker that did not confirm `stale` (not
routable) until the registry task catches it up. Requests that arrive meanwhile wait in
the router queue instead of failing.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import random
from typing import Any

import attrs
import trio

from dsrouter.access import new_request_id
from dsrouter.config import Config
from dsrouter.context import RouterContext
from dsrouter.registry import Health, Worker
from dsrouter.tracing import Span
from dsrouter.workers_http import fan_out

log = logging.getLogger("dsrouter.control")

ROUTER_FIELDS = frozenset(
    {"mode", "strict", "verify_checksum", "drain_timeout_s", "weight_version"}
)
"""Refit options for the router itself; workers would reject unknown fields."""
WEIGHT_ROUTES = frozenset(
    {
        "/update_weights_from_disk",
        "/update_weights_from_tensor",
        "/v1/set_lora",
        "/v1/merge_lora_weights",
        "/v1/unmerge_lora_weights",
    }
)
TARGET_HEADER = "x-dsrouter-target-workers"
"""Names the workers a weight change or read goes to (URLs or worker ids, comma-separated);
without it, the whole active pool."""
REPLAYABLE = frozenset(WEIGHT_ROUTES - {"/update_weights_from_tensor"})
"""Tensor payloads are CUDA IPC handles of a co-located trainer: they cannot be replayed."""
CHECKSUM_BODY = b"{}"
"""What `get_weights_checksum` is asked for (all modules), after a refit and in a catch-up
alike, so the two answers are comparable."""
CATCH_UP_FIRST_DELAY_S = 1.0
CATCH_UP_MAX_DELAY_S = 60.0


class ControlError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@attrs.frozen
class Step:
    """One weight change the pool went through, kept so late workers can replay it."""

    path: str
    body: bytes


def active(worker: Worker) -> bool:
    return worker.health is not Health.DEAD and not worker.sleeping and not worker.draining


def no_active_workers(workers: list[Worker]) -> ControlError:
    """The 503 for a control call nobody can take. With every live worker asleep it says so:
    the predecessors answered 200 with empty results and loaded nothing, so a trainer
    refitting a sleeping pool believed its weights were served (MIGRATING.md)."""
    if any(w.sleeping for w in workers) and all(
        w.sleeping or w.health is Health.DEAD for w in workers
    ):
        return ControlError(503, "All workers are asleep: POST /resume_memory_occupation first")
    return ControlError(503, "No healthy workers available in the pool")


class PoolControl:
    def __init__(self, context: RouterContext) -> None:
        self.context = context
        self.registry = context.registry
        self.workers = context.workers
        self.metrics = context.metrics
        self.recipe: list[Step] = []
        """Weight changes since the last refit from disk: what a late worker must replay.
        A tensor update cannot be replayed, so it leaves only its (body-less) marker."""
        self.checksum: str | None = None
        """The checksum the pool agreed on (canonical JSON) when its current version was
        verified (`verify_checksum`), else None. A catch-up must reproduce it: replaying the
        recipe is not proof that a worker holds the same weights as the others."""
        self._rng = random.Random()

    @property
    def config(self) -> Config:
        return self.context.config

    # ---- broadcasting --------------------------------------------------------------------

    async def broadcast(
        self,
        workers: list[Worker],
        method: str,
        path: str,
        body: bytes | None,
        request_id: str | None = None,
    ) -> list[dict[str, Any]]:
        """One call to each worker, concurrently, each bounded by `timeouts.control_s`.

        Every call carries `request_id` as `x-request-id`, so the workers' logs of one
        broadcast can be found from the router's.
        """
        request_id = request_id or new_request_id()
        timeout = self.config.timeouts.control_s
        attributes = {
            "dsrouter.control.path": path,
            "http.request.method": method,
            "dsrouter.request_id": request_id,
            "dsrouter.broadcast.workers": len(workers),
        }
        with self.context.tracing.span("dsrouter.broadcast", attributes) as span:
            calls = await fan_out(
                workers,
                lambda w: self._call(w, method, path, body, request_id, parent=span),
                timeout,
            )
            results = [
                call
                if call is not None
                else _unanswered(worker, f"Worker request timed out after {timeout:g}s")
                for worker, call in zip(workers, calls, strict=True)
            ]
            answered = sum(r["status_code"] == 200 for r in results)
            span.set_attributes({"dsrouter.broadcast.ok": answered})
            if answered < len(results):
                span.fail(f"{len(results) - answered} of {len(results)} workers did not answer 200")
        ok = all(r["status_code"] == 200 for r in results)
        self.metrics.broadcasts.labels(path, "ok" if ok else "partial").inc()
        return results

    async def _call(
        self,
        worker: Worker,
        method: str,
        path: str,
        body: bytes | None,
        request_id: str | None = None,
        *,
        parent: Span | None = None,
    ) -> dict[str, Any]:
        """One control call; its span is a child of `parent` (a broadcast's), else of the
        task's current span (a refit's or catch-up's), and the worker gets it as its
        `traceparent`."""
        tracing = self.context.tracing
        attributes = {
            "dsrouter.control.path": path,
            "dsrouter.worker.url": worker.url,
            "dsrouter.worker.id": worker.display_id,
        }
        with tracing.span(
            "dsrouter.control_call", attributes, parent=parent, kind="client"
        ) as span:
            headers = [
                (b"x-request-id", (request_id or new_request_id()).encode()),
                *tracing.headers(span),
            ]
            with self.registry.lease_worker(worker):
                answer = await self.workers.call(
                    worker.url,
                    method,
                    path,
                    api_key=worker.api_key,
                    body=body,
                    headers=headers,
                    timeout_s=self.config.timeouts.control_s,
                )
            if answer.status is None:
                span.fail(answer.error or "no answer")
                return _unanswered(worker, answer.error or "no answer")
            span.set_attributes({"http.response.status_code": answer.status})
            if answer.status != 200:
                span.fail(f"worker answered {answer.status}")
        try:
            body = answer.json()
        except ValueError:  # the predecessors' shape for a plain-text answer (SEEDS.md)
            body = {"raw": answer.body.decode(errors="replace")}
        return {"worker_url": worker.url, "status_code": answer.status, "body": body}

    def resolve_targets(self, names: str | None) -> list[Worker] | None:
        """The workers `TARGET_HEADER` names, or None when it is absent (the whole pool).

        A name no worker has is a 400; a named worker that cannot take the call (dead,
        asleep, draining) a 503 naming it: the caller asked for that worker, so going on
        without it would hide the miss. Call with the control lock held.
        """
        if names is None:
            return None
        wanted = [name.strip() for name in names.split(",") if name.strip()]
        if not wanted:
            raise ControlError(400, f"{TARGET_HEADER} names no worker")
        found: list[Worker] = []
        unknown = []
        for name in wanted:
            worker = self.registry.by_id(name)
            if worker is None:
                unknown.append(name)
            elif worker not in found:
                found.append(worker)
        if unknown:
            raise ControlError(400, f"{TARGET_HEADER}: unknown worker(s): {', '.join(unknown)}")
        idle = [w.url for w in found if not active(w)]
        if idle:
            raise ControlError(503, f"target worker(s) dead, asleep or draining: {', '.join(idle)}")
        return found

    # ---- refit ---------------------------------------------------------------------------

    async def change_weights(
        self,
        path: str,
        raw: bytes,
        request_id: str | None = None,
        target_names: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """`_change_weights` inside a `dsrouter.refit` span saying the version reached and
        how it went (`success`, `partial`: some workers confirmed, `failed`: none)."""
        request_id = request_id or new_request_id()
        attributes = {"dsrouter.refit.path": path, "dsrouter.request_id": request_id}
        with self.context.tracing.span("dsrouter.refit", attributes) as span:
            status, answer = await self._change_weights(path, raw, request_id, target_names)
            confirmed = sum(_succeeded(r) for r in answer["results"])
            result = "success" if answer["success"] else "partial" if confirmed else "failed"
            span.set_attributes(
                {
                    "dsrouter.refit.version": answer["version"] or "",
                    "dsrouter.refit.result": result,
                    "dsrouter.refit.workers": len(answer["results"]),
                    "dsrouter.refit.confirmed": confirmed,
                    "dsrouter.refit.stale_workers": answer["stale_workers"],
                    "http.response.status_code": status,
                }
            )
            if result != "success":
                span.fail(answer.get("message") or f"refit {result}")
        self.metrics.refits.labels(result).inc()
        return status, answer

    async def _change_weights(
        self,
        path: str,
        raw: bytes,
        request_id: str,
        target_names: str | None,
    ) -> tuple[int, dict[str, Any]]:
        """A weight change (disk, tensor, LoRA) applied to the pool as one transaction.

        The body is parsed only to read the router's own options (`ROUTER_FIELDS`). Workers
        get the client's bytes verbatim (SEEDS.md), unless the body carries router options:
        workers would reject those, so then it is re-encoded without them. The bytes sent
        are also what a catch-up replays.
        """
        options = _json_object(raw)
        version = options.get("weight_version")
        if version is not None and not isinstance(version, str):
            raise ControlError(400, "weight_version must be a string")
        mode = options.get("mode", "drain")
        if mode not in ("drain", "immediate"):
            raise ControlError(400, "mode must be 'drain' or 'immediate'")
        if not raw.strip():
            forwarded = b"{}"
        elif ROUTER_FIELDS.isdisjoint(options):
            forwarded = raw
        else:
            forwarded = json.dumps(
                {k: v for k, v in options.items() if k not in ROUTER_FIELDS}
            ).encode()
        version = version or _derive_version(path, forwarded, self.registry.target_version)
        async with self.registry.control_lock:
            named = self.resolve_targets(target_names)
            if named is not None:
                return await self._change_some(path, forwarded, named, options, request_id)
            targets = [w for w in self.registry.workers() if active(w)]
            if not targets:
                raise no_active_workers(self.registry.workers())
            with self.registry.pause() if mode == "drain" else contextlib.nullcontext():
                if mode == "drain":
                    await self._drain(targets, options.get("drain_timeout_s"))
                results = await self.broadcast(targets, "POST", path, forwarded, request_id)
                confirmed = [w for w, r in zip(targets, results, strict=True) if _succeeded(r)]
                if confirmed:
                    self._commit(path, forwarded, version, confirmed, targets, results)
                agreed = True
                if confirmed and options.get("verify_checksum"):
                    agreed = await self._verify(confirmed, request_id)
        stale = [w.url for w in self.registry.workers() if w.stale]
        success = (
            agreed and len(confirmed) == len(targets) and not any(w.url in stale for w in confirmed)
        )
        answer = {
            "results": results,
            "success": success,
            "version": self.registry.target_version,
            "stale_workers": stale,
        }
        if not confirmed:
            answer["message"] = "no worker applied the update; the pool keeps its weights"
        elif not agreed:
            answer["message"] = (
                "the weights checksum could not be verified: no majority "
                "of the workers' answers agrees; none was marked stale"
            )
        status = 200
        if options.get("strict") and not success:
            status = 207 if confirmed else 500
        log.info(
            "%s -> version %s: %d/%d workers confirmed [%s]",
            path,
            self.registry.target_version,
            len(confirmed),
            len(targets),
            request_id,
        )
        return status, answer

    async def _change_some(
        self,
        path: str,
        body: bytes,
        workers: list[Worker],
        options: dict[str, Any],
        request_id: str,
    ) -> tuple[int, dict[str, Any]]:
        """A weight change for the named workers only, as the predecessors sent these routes
        to one worker: a co-located trainer's tensor update reaches only the workers on its
        host (CUDA IPC handles do not cross hosts).

        Sent at once (no drain: the rest of the pool keeps serving), and the pool's version,
        recipe and stale marks are left alone: the other workers were not asked, so nothing
        says they are behind, and the router cannot know which of the two weights the pool
        should hold. Keeping the pool consistent is the caller's part.
        """
        results = await self.broadcast(workers, "POST", path, body, request_id)
        success = all(_succeeded(r) for r in results)
        answer = {
            "results": results,
            "success": success,
            "version": self.registry.target_version,
            "stale_workers": [w.url for w in self.registry.workers() if w.stale],
            "target_workers": [w.url for w in workers],
        }
        status = 200
        if options.get("strict") and not success:
            status = 207 if any(_succeeded(r) for r in results) else 500
        log.info(
            "%s on %d named worker(s): %d confirmed [%s]",
            path,
            len(workers),
            sum(_succeeded(r) for r in results),
            request_id,
        )
        return status, answer

    def _commit(
        self,
        path: str,
        body: bytes,
        version: str,
        confirmed: list[Worker],
        targets: list[Worker],
        results: list[dict[str, Any]],
    ) -> None:
        """Move the pool to `version`. Workers that failed are marked stale, which also has
        the registry task catch them up (`Registry.mark_stale`)."""
        if path == "/update_weights_from_disk":
            self.recipe = []
        if path in REPLAYABLE:
            self.recipe.append(Step(path, body))
        else:  # never replayed: keep the marker, not a body that may be gigabytes
            self.recipe = [Step(path, b"")]
        self.checksum = None
        self.registry.set_target(version)
        for worker in confirmed:
            self.registry.confirm_weights(worker, version)
        for worker, result in zip(targets, results, strict=True):
            if worker not in confirmed:
                self.registry.mark_stale(worker, f"refit failed: {_reason(result)}")

    async def _drain(self, workers: list[Worker], limit_s: Any = None) -> None:
        """Wait until the workers finish what they are serving, at most `limit_s`."""
        if not (isinstance(limit_s, int | float) and limit_s > 0):
            limit_s = self.config.server.drain_timeout_s
        with trio.move_on_after(limit_s):
            while any(w.in_flight for w in workers):
                await self.registry.changed.wait()

    async def _verify(self, workers: list[Worker], request_id: str) -> bool:
        """Checksums after a refit: workers disagreeing with the majority become stale.

        The majority is remembered (`self.checksum`) so that a catch-up of any of this
        version's stale workers is held to it too. Without a strict majority (two workers
        that disagree, or a tie) nothing says which side is right: no worker is marked, and
        False tells the caller the pool is not verified.
        """
        results = await self.broadcast(
            workers, "POST", "/get_weights_checksum", CHECKSUM_BODY, request_id
        )
        sums = [_canonical(r["body"]) if r["status_code"] == 200 else None for r in results]
        ranked = collections.Counter(s for s in sums if s is not None).most_common(2)
        if not ranked or (len(ranked) == 2 and ranked[0][1] == ranked[1][1]):
            log.warning("no majority among the checksums after the refit [%s]", request_id)
            return False
        majority = ranked[0][0]
        self.checksum = majority
        for worker, checksum in zip(workers, sums, strict=True):
            if checksum != majority:
                self.registry.mark_stale(worker, "weights checksum differs from the pool")
        return True

    def new_lineage(self, reason: str) -> None:
        """The workers are moving to another model: the refits since the last one belong to
        the old model, so nobody replays them and no worker is stale for lacking them."""
        if self.registry.target_version is None and not self.recipe:
            return
        log.warning(
            "%s: the pool's weights (version %s) are dropped; workers serve their launch "
            "weights until the next refit",
            reason,
            self.registry.target_version,
        )
        self.recipe.clear()
        self.checksum = None
        self.registry.clear_target()

    # ---- sleep and wake ------------------------------------------------------------------

    async def release(self, raw: bytes, request_id: str | None = None) -> dict[str, Any]:
        async with self.registry.control_lock:
            workers = self.registry.workers()
            targets = [w for w in workers if active(w)]
            if not targets:
                asleep = sum(w.sleeping for w in workers)
                if asleep:
                    return {
                        "results": [],
                        "message": "All workers are already sleeping",
                        "sleeping_workers": asleep,
                    }
                raise ControlError(503, "No healthy workers available in the pool")
            with self.registry.pause():
                await self._drain(targets)
                results = await self.broadcast(
                    targets, "POST", "/release_memory_occupation", raw or b"{}", request_id
                )
                for worker, result in zip(targets, results, strict=True):
                    if result["status_code"] == 200:
                        self.registry.set_sleeping(worker, True)
                self.registry.set_pool_sleeping(
                    all(w.sleeping for w in self.registry.workers() if active(w) or w.sleeping)
                )
        return {"results": results}

    async def resume(self, raw: bytes, request_id: str | None = None) -> dict[str, Any]:
        async with self.registry.control_lock:
            workers = self.registry.workers()
            targets = [w for w in workers if w.sleeping]
            if not targets:
                self.registry.set_pool_sleeping(False)
                return {
                    "results": [],
                    "message": "All workers are already active",
                    "active_workers": sum(w.health is not Health.DEAD for w in workers),
                }
            results = await self.broadcast(
                targets, "POST", "/resume_memory_occupation", raw or b"{}", request_id
            )
            for worker, result in zip(targets, results, strict=True):
                if result["status_code"] == 200:
                    self.registry.set_sleeping(worker, False)
            # Only now: until a worker is awake, a request is told "pool is asleep" (503
            # with Retry-After), not "no healthy workers".
            if any(not w.sleeping for w in targets):
                self.registry.set_pool_sleeping(False)
        return {"results": results}

    # ---- catch-up (run by the registry task) ---------------------------------------------

    async def catch_up(self, url: str) -> None:
        """Bring a worker in line with the pool: asleep if the pool sleeps, else awake and on
        the pool's weights (replaying its weight changes, retrying with backoff).

        A worker that joins or recovers while the pool sleeps is put to sleep, and nothing
        else: its weights are replayed when the pool wakes (the wake asks again). One the
        router still counts as asleep while the pool is awake (it was dead at the wake, or
        died asleep and came back as a new, awake process) is resumed first: release and
        resume are idempotent on a worker, so neither case needs to be told from the other.
        Otherwise this runs until the worker is on the pool's version, or can no longer be
        caught up now (gone, not healthy: the registry asks again when that changes). Marking
        the worker stale from in here (`mark_stale`) asks for a catch-up too, but the registry
        runs one catch-up per worker at a time and drops that request, so this loop is the
        only retry.
        """
        delay = CATCH_UP_FIRST_DELAY_S
        while True:
            worker = self.registry.by_url(url)
            if worker is None or worker.health is not Health.HEALTHY:
                return
            if self.registry.pool_sleeping:
                await self._put_to_sleep(worker)
                return
            if worker.sleeping:
                await self._wake(worker)
            if not worker.sleeping:
                if not worker.stale:
                    return
                if any(step.path not in REPLAYABLE for step in self.recipe):
                    self.registry.mark_stale(
                        worker,
                        "cannot catch up: the pool's weights came "
                        "from a tensor update, which cannot be replayed",
                    )
                    return
                async with self.registry.control_lock:
                    await self._traced_replay(worker)
                if not worker.stale:
                    return
            await trio.sleep(delay * self._rng.uniform(0.8, 1.2))
            delay = min(delay * 2, CATCH_UP_MAX_DELAY_S)

    async def _put_to_sleep(self, worker: Worker) -> None:
        """Release a late worker's GPU memory, as the pool's release did for the others.

        Also when the router counts it as asleep already: it recovered from dead, and may
        be a new process that starts awake (a release of a sleeping worker is a no-op)."""
        async with self.registry.control_lock:
            if not self.registry.pool_sleeping:
                return
            request_id = new_request_id()
            result = await self._call(
                worker, "POST", "/release_memory_occupation", b"{}", request_id
            )
            if result["status_code"] == 200:
                self.registry.set_sleeping(worker, True)
                log.info(
                    "%s joined a sleeping pool: put to sleep [%s]", worker.display_id, request_id
                )
            else:
                log.warning(
                    "%s joined a sleeping pool and could not be put to sleep: %s [%s]",
                    worker.display_id,
                    _reason(result),
                    request_id,
                )

    async def _wake(self, worker: Worker) -> None:
        """Resume a worker counted as asleep while the pool is awake (it missed the wake)."""
        async with self.registry.control_lock:
            if self.registry.pool_sleeping or not worker.sleeping:
                return
            request_id = new_request_id()
            result = await self._call(
                worker, "POST", "/resume_memory_occupation", b"{}", request_id
            )
            if result["status_code"] == 200:
                self.registry.set_sleeping(worker, False)
                log.info("%s missed the wake: resumed [%s]", worker.display_id, request_id)
            else:
                log.warning(
                    "%s missed the wake and could not be resumed: %s [%s]",
                    worker.display_id,
                    _reason(result),
                    request_id,
                )

    async def _traced_replay(self, worker: Worker) -> None:
        """`_replay` in a `dsrouter.catch_up` span of its own (a new trace: nobody asked)."""
        request_id = new_request_id()
        attributes = {
            "dsrouter.worker.url": worker.url,
            "dsrouter.worker.id": worker.display_id,
            "dsrouter.refit.version": self.registry.target_version or "",
            "dsrouter.request_id": request_id,
        }
        with self.context.tracing.span("dsrouter.catch_up", attributes) as span:
            await self._replay(worker, request_id)
            span.set_attributes({"dsrouter.catch_up.confirmed": not worker.stale})
            if worker.stale:
                span.fail("the worker is still stale after the catch-up")

    async def _replay(self, worker: Worker, request_id: str) -> None:
        """One catch-up attempt: the recipe, then the checksum check if the pool has one.

        The worker is confirmed only at the very end, so it is never routable on weights
        that were not checked.
        """
        version = self.registry.target_version
        if version is None or not self.recipe or not worker.stale:
            return
        for step in self.recipe:
            result = await self._call(worker, "POST", step.path, step.body, request_id)
            if not _succeeded(result):
                self.registry.mark_stale(worker, f"catch-up failed: {_reason(result)}")
                log.warning(
                    "catch-up of %s failed: %s [%s]", worker.display_id, _reason(result), request_id
                )
                return
        if self.checksum is not None:
            result = await self._call(
                worker, "POST", "/get_weights_checksum", CHECKSUM_BODY, request_id
            )
            if result["status_code"] != 200 or _canonical(result["body"]) != self.checksum:
                reason = (
                    "weights checksum differs from the pool's"
                    if result["status_code"] == 200
                    else f"weights checksum unavailable: {_reason(result)}"
                )
                self.registry.mark_stale(worker, f"catch-up failed: {reason}")
                log.warning("catch-up of %s failed: %s [%s]", worker.display_id, reason, request_id)
                return
        self.registry.confirm_weights(worker, version)
        log.info("worker %s caught up to %s [%s]", worker.display_id, version, request_id)


def _unanswered(worker: Worker, error: str) -> dict[str, Any]:
    """The entry of a worker that gave no answer, in the predecessors' shape (a 502 with the
    error inside `body`, which their clients parse); `error` at the top says it was not the
    worker's own 502."""
    return {
        "worker_url": worker.url,
        "status_code": 502,
        "body": {"error": error},
        "error": error,
    }


def _canonical(body: Any) -> str:
    """A checksum answer in a form that compares equal whatever the key order."""
    return json.dumps(body, sort_keys=True)


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ControlError(400, f"invalid JSON body: {exc}") from None
    if not isinstance(value, dict):
        raise ControlError(400, "request body must be a JSON object")
    return value


def _succeeded(result: dict[str, Any]) -> bool:
    body = result["body"]
    if result["status_code"] != 200:
        return False
    return not (isinstance(body, dict) and body.get("success") is False)


def _reason(result: dict[str, Any]) -> str:
    if result.get("error"):
        return str(result["error"])
    body = result["body"]
    message = body.get("message") or body.get("detail") if isinstance(body, dict) else body
    return f"{result['status_code']}: {str(message)[:200]}"


def _derive_version(path: str, body: bytes, current: str | None) -> str:
    """A version name when the trainer gave none: the model path for a disk refit."""
    if path == "/update_weights_from_disk":
        model_path = json.loads(body).get("model_path")
        if isinstance(model_path, str) and model_path:
            return model_path
    digest = hashlib.sha256(body).hexdigest()[:12]
    return f"{current or 'base'}+{path.rsplit('/', 1)[1]}:{digest}"
