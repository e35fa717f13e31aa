"""`GET /v1/models` and `GET /v1/models/{model}`: the pool's models, merged from every
routable worker (a request's `model` is routed by the same names, see `proxy.Proxy._accept`).

While the pool sleeps it answers like inference does (503 "pool is asleep" with
Retry-After), so a client can tell "come back later" from "the pool is broken".
"""

from __future__ import annotations

from typing import Any

from quart import Blueprint

from dsrouter.api.errors import error
from dsrouter.api.workers import ctx
from dsrouter.proxy import model_not_found
from dsrouter.registry import ASLEEP_RETRY_AFTER_S, Worker
from dsrouter.workers_http import fan_out

bp = Blueprint("discovery", __name__)


@bp.get("/v1/models")
async def list_models() -> Any:
    cards = await _merged_cards()
    if not isinstance(cards, list):
        return cards
    return {"object": "list", "data": cards}


@bp.get("/v1/models/<path:model>")
async def get_model(model: str) -> Any:
    """One card of the merged list, found by any name a request's `model` may use: its id
    (the served name), else the card of a worker known by that name (its model path, see
    `health.probe_capabilities`); else the 404 a worker gives."""
    cards = await _merged_cards()
    if not isinstance(cards, list):
        return cards
    ids = [model]
    ids += [
        w.capabilities.model_id
        for w in ctx().registry.workers()
        if model in w.capabilities.model_names
    ]
    for wanted in ids:
        for card in cards:
            if card.get("id") == wanted:
                return card
    return model_not_found(model), 404


async def _merged_cards() -> list[dict[str, Any]] | tuple[Any, int]:
    """Every routable worker's `/v1/models` cards, one per id; or the error answer."""
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

    timeout = context.config.timeouts.discovery_s

    async def ask(worker: Worker) -> None:
        answer = await context.workers.call(
            worker.url, "GET", "/v1/models", api_key=worker.api_key, timeout_s=timeout
        )
        try:
            if answer.status is None:
                failures[worker.url] = answer.error or "no answer"
            elif not answer.ok:
                failures[worker.url] = f"answered {answer.status}"
            else:
                answers[worker.url] = answer.json()
        except ValueError as exc:
            failures[worker.url] = f"not JSON: {exc}"

    await fan_out(workers, ask, timeout)
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
    return list(seen.values())
