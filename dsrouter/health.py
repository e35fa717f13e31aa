"""Active health probes and capability probes.

Each round probes every registered worker concurrently, each probe inside its own cancel scope,
and reports the verdict to the registry, which owns the state machine. Rounds start on a fixed
cadence (`health.interval_s` from the start of the previous round), so a slow worker delays
nobody else's probe.
"""

from __future__ import annotations

import logging
from contextlib import aclosing
from typing import Any

import httpx
import trio

from dsrouter.config import HealthConfig
from dsrouter.registry import Capabilities, ProbeOutcome, Registry, video_support_from
from dsrouter.upstream import Upstream, UpstreamError

log = logging.getLogger("dsrouter.health")


PROBE_BODY_LIMIT = 4096


async def probe_health(
    upstream: Upstream, url: str, timeout_s: float
) -> tuple[ProbeOutcome, str | None, float | None]:
    """GET `/health` once; classify the answer the way WORKER_API.md §2 describes it.

    Probes ride the proxy's own keep-alive pools rather than httpx: with a thousand workers
    the probe loop runs a thousand requests per interval, and httpx's client layer cost
    several times the CPU per request (bench/RESULTS.md, section e).
    """
    started = trio.current_time()
    with trio.move_on_after(timeout_s):
        try:
            response = await upstream.send("GET", url, "/health", [], None)
            body = b""
            try:
                async with aclosing(response.aiter_raw()) as chunks:
                    async for chunk in chunks:
                        body += chunk[: PROBE_BODY_LIMIT - len(body)]
            finally:
                await response.aclose()
        except UpstreamError as exc:
            if exc.connect:
                return ProbeOutcome.REFUSED, f"connect failed: {exc}", None
            return ProbeOutcome.FAILED, f"probe failed: {exc}", None
        latency = trio.current_time() - started
        if response.status_code == 200:
            return ProbeOutcome.OK, None, latency
        if response.status_code == 503 and not body:
            return ProbeOutcome.WARMING, "warming up (503)", latency
        detail = body[:200].decode(errors="replace")
        return ProbeOutcome.FAILED, f"/health answered {response.status_code}: {detail}", latency
    return ProbeOutcome.FAILED, f"/health timed out after {timeout_s:g}s", None


async def probe_capabilities(
    client: httpx.AsyncClient, url: str, timeout_s: float
) -> Capabilities | None:
    """Read task and output types from `/model_info`, falling back to `/v1/models`.

    `/model_info` is never held during warm-up and carries `output_types`; `/v1/models` is
    what the routers we succeed used. None means "no answer": keep what we knew.
    """
    info = await _get_json(client, f"{url}/model_info", timeout_s)
    models = await _get_json(client, f"{url}/v1/models", timeout_s)
    card: dict[str, Any] = {}
    if isinstance(models, dict) and isinstance(models.get("data"), list) and models["data"]:
        first = models["data"][0]
        card = first if isinstance(first, dict) else {}
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
    return Capabilities(
        model_id=model_id if isinstance(model_id, str) else None,
        task_types=task_types,
        output_types=output_types,
        video_support=video_support_from(task_types, output_types),
        model_info=info or None,
    )


async def _get_json(client: httpx.AsyncClient, url: str, timeout_s: float) -> Any:
    with trio.move_on_after(timeout_s):
        try:
            response = await client.get(url)
        except httpx.HTTPError:
            return None
        except (httpx.InvalidURL, UnicodeError) as exc:
            # httpx checks the host when it parses the URL, and the resolver IDNA-encodes
            # it (httpcore passes that UnicodeError on): a host `normalize_worker_url` should
            # have refused. No answer, and a line that says why.
            log.error("capability probe of %s: the URL cannot be requested: %s", url, exc)
            return None
        if response.status_code != 200:
            return None
        try:
            return response.json()
        except ValueError:
            return None
    return None


class HealthChecker:
    """Runs probe rounds and offers a one-off probe for freshly registered workers."""

    def __init__(
        self,
        registry: Registry,
        client: httpx.AsyncClient,
        upstream: Upstream,
        config: HealthConfig,
    ) -> None:
        self.registry = registry
        self.client = client
        self.upstream = upstream
        self.config = config

    async def probe_now(self, url: str) -> None:
        """Probe one worker and report the verdict; never raises (but `trio.Cancelled`).

        Every probe runs as a task of a round's nursery (or a reload's, or a registration's
        request): an exception here would end the round and, through the root nursery, the
        router. Transport failures are verdicts already (`probe_health`); anything else is a
        bug about this one worker, logged with its traceback and counted as a failed probe.
        """
        try:
            outcome, error, latency = await probe_health(self.upstream, url, self.config.timeout_s)
        except Exception as exc:
            log.exception("health probe of %s raised; counted as a failed probe", url)
            outcome, error, latency = ProbeOutcome.FAILED, f"probe error: {exc!r}", None
        self.registry.apply_probe(url, outcome, error, latency)

    async def capabilities(self, url: str) -> Capabilities | None:
        return await probe_capabilities(self.client, url, self.config.timeout_s)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            deadline = trio.current_time() + self.config.interval_s
            async with trio.open_nursery() as nursery:
                for worker in self.registry.workers():
                    nursery.start_soon(self.probe_now, worker.url)
            await trio.sleep_until(deadline)
