"""`GET /v1/models`: the pool's models, merged from every routable worker.

While the pool sleeps it answers like inference does (503 "pool is asleep" with
Retry-After), so a client can tell "come back later" from "the pool is broken".
"""

from __future__ import annotations

from typing import Any

import httpx
import trio
from quart import Blueprint

from dsrouter.api.errors import error
from dsrouter.api.workers import ctx
from dsrouter.registry import ASLEEP_RETRY_AFTER_S

bp = Blueprint("discovery", __name__)


@bp.get("/v1/models")
async def list_models() -> Any:
    context = ctx()
    workers = context.registry.routable()
    if not workers:
        if context.registry.pool_sleeping:
            return error(
                503, "pool is asleep", headers=[("Retry-After", str(ASLEEP_RETRY_AFTER_S))]
            )
        return error(503, "No healthy workers available in the pool")
    answers: dict[str, Any] = {}
    failures: dict[str, str] = {}

    async def ask(url: str) -> None:
        with trio.move_on_after(context.config.timeouts.discovery_s):
            try:
                response = await context.client.get(f"{url}/v1/models")
                response.raise_for_status()
                answers[url] = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                failures[url] = f"{type(exc).__name__}: {exc}"
            return
        failures[url] = "timed out"

    async with trio.open_nursery() as nursery:
        for worker in workers:
            nursery.start_soon(ask, worker.url)
    if not answers:
        return error(502, "Failed to fetch models from any worker", details=failures)
    seen: dict[str, Any] = {}
    for worker in workers:
        data = (
            answers.get(worker.url, {}).get("data")
            if isinstance(answers.get(worker.url), dict)
            else None
        )
        for card in data if isinstance(data, list) else []:
            if isinstance(card, dict) and card.get("id") not in seen:
                seen[card.get("id")] = card
    return {"object": "list", "data": list(seen.values())}
