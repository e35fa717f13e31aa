"""Active health probes and capability probes.

Each round probes every registered worker concurrently, each probe inside its own cancel scope,
and reports the verdict to the registry, which owns the state machine. Rounds start on a fixed
cadence (`health.interval_s` from the start of the previous round), so a slow worker delays
nobody else's probe.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from dsrouter.config import HealthConfig
from dsrouter.registry import Capabilities, Registry, video_support_from
from dsrouter.workers_http import HealthReading, ProbeOutcome, WorkerHTTP, fan_out

log = logging.getLogger("dsrouter.health")


async def probe_capabilities(
    workers: WorkerHTTP, url: str, api_key: str, timeout_s: float
) -> Capabilities | None:
    """Read task and output types from `/model_info`, falling back to `/v1/models`, and
    the names a request's `model` may use for the worker from both.

    `/model_info` is never held during warm-up and carries `output_types`; `/v1/models` is
    what the routers we succeed used. None means "no answer": keep what we knew.
    """
    info = await _get_json(workers, url, "/model_info", api_key, timeout_s)
    models = await _get_json(workers, url, "/v1/models", api_key, timeout_s)
    cards = models.get("data") if isinstance(models, dict) else None
    cards = [c for c in cards if isinstance(c, dict)] if isinstance(cards, list) else []
    card: dict[str, Any] = cards[0] if cards else {}
    if not isinstance(info, dict):
        info = {}
    if not info and not card:
        return None
    tasks = info.get("supported_task_types") or card.get("supported_task_types")
    if not isinstance(tasks, list):
        first_task = info.get("task_type") or card.get("task_type")
        tasks = [first_task] if isinstance(first_task, str) else []
    outputs = info.get("output_types")
    outputs = outputs if isinstance(outputs, list) else []
    task_types = tuple(str(t) for t in tasks)
    output_types = tuple(str(o) for o in outputs)
    model_id = card.get("id") or info.get("model_path")
    names = {info.get("model_path"), *(c.get("id") for c in cards), *(c.get("root") for c in cards)}
    return Capabilities(
        model_id=model_id if isinstance(model_id, str) else None,
        task_types=task_types,
        output_types=output_types,
        video_support=video_support_from(task_types, output_types),
        model_info=info or None,
        model_names=frozenset(n for n in names if isinstance(n, str) and n),
    )


async def _get_json(
    workers: WorkerHTTP, url: str, path: str, api_key: str, timeout_s: float
) -> Any:
    answer = await workers.call(url, "GET", path, api_key=api_key, timeout_s=timeout_s)
    if not answer.ok:
        return None
    try:
        return answer.json()
    except ValueError:
        return None


class HealthChecker:
    """Runs probe rounds and offers a one-off probe for freshly registered workers."""

    def __init__(self, registry: Registry, workers: WorkerHTTP, config: HealthConfig) -> None:
        self.registry = registry
        self.workers = workers
        self.config = config

    def _api_key(self, url: str) -> str:
        worker = self.registry.by_url(url)
        return worker.api_key if worker is not None else ""

    async def probe_now(self, url: str) -> None:
        """Probe one worker and report the verdict; never raises (but `trio.Cancelled`).

        Every probe runs as a task of a round's nursery (or a reload's, or a registration's
        request): an exception here would end the round and, through the root nursery, the
        router. Transport failures are verdicts already (`WorkerHTTP.probe`); anything else
        is a bug about this one worker, logged with its traceback and counted as a failed
        probe.
        """
        try:
            reading = await self.workers.probe(
                url, api_key=self._api_key(url), timeout_s=self.config.timeout_s
            )
        except Exception as exc:
            log.exception("health probe of %s raised; counted as a failed probe", url)
            reading = HealthReading(ProbeOutcome.FAILED, f"probe error: {exc!r}")
        log.debug(
            "probe %s: %s%s%s",
            url,
            reading.outcome.value,
            f" ({reading.detail})" if reading.detail else "",
            "" if reading.latency_s is None else f" in {reading.latency_s * 1000:.0f} ms",
        )
        self.registry.apply_probe(url, reading.outcome, reading.detail, reading.latency_s)

    async def capabilities(self, url: str) -> Capabilities | None:
        return await probe_capabilities(
            self.workers, url, self._api_key(url), self.config.timeout_s
        )

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            deadline = trio.current_time() + self.config.interval_s
            urls = [worker.url for worker in self.registry.workers()]
            # Each probe bounds itself by `timeout_s`; the fan-out's deadline is a backstop.
            await fan_out(urls, self.probe_now, 2 * self.config.timeout_s)
            await trio.sleep_until(deadline)
