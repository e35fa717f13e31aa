"""A Python client for RL trainers and operators that drive a dsrouter pool.

An RL step is wake → refit → rollout → sleep → train. Over raw HTTP every step answers 200
even when part of the pool did not follow (the seed contract), so a trainer must inspect
per-worker results to notice a worker left on old weights. This client does that once:
`refit` raises `RefitError` naming the workers that did not confirm the new weights, and a
request refused because the pool sleeps raises `PoolAsleepError` instead of a bare 503.

`Client` (blocking) and `AsyncClient` (any event loop httpx supports: asyncio or trio)
have the same methods. Both describe each call once as a `_Call` (what to send, how to
read the answer), so the two cannot drift apart; they differ only in how they send it.

Credentials: the admin token guards the control plane (workers, refits, sleep), API keys
guard inference; both travel as `Authorization: Bearer ...` (see `dsrouter/auth.py`).
The router accepts the admin token on inference routes too, so a trainer holding only the
admin token can do everything.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import attrs
import httpx
import msgpack

from dsrouter.urls import normalize_worker_url, worker_id_for

__all__ = [
    "ADMIN_TOKEN_ENV",
    "API_KEY_ENV",
    "DEFAULT_URL",
    "AsyncClient",
    "BroadcastResult",
    "Client",
    "DsrouterError",
    "HTTPStatusError",
    "ImageResult",
    "PoolAsleepError",
    "PoolHealth",
    "RefitError",
    "RefitResult",
    "RouterUnreachableError",
    "WorkerInfo",
    "WorkerResult",
]

DEFAULT_URL = "http://127.0.0.1:30080"
ADMIN_TOKEN_ENV = "DSROUTER_ADMIN_TOKEN"
API_KEY_ENV = "DSROUTER_API_KEY"
DEFAULT_TIMEOUT_S = 1800.0
"""As the router's own `timeouts.control_s`: a refit drains the pool and loads checkpoints."""

T = TypeVar("T")


# ---- errors ------------------------------------------------------------------------------


class DsrouterError(Exception):
    """Base of every error this client raises on purpose."""


class RouterUnreachableError(DsrouterError):
    """No HTTP answer from the router: refused, unresolvable, timed out or cut off."""


class HTTPStatusError(DsrouterError):
    """The router (or a worker, passed through) answered with an unexpected status.

    `message` is the router's `{"error": ...}` (or a worker's `detail`/`message`) when the
    body carries one, `body` the decoded JSON (or text) for anything more.
    """

    def __init__(self, method: str, url: str, status: int, message: str, body: Any) -> None:
        super().__init__(f"{method} {url} -> {status}: {message}")
        self.method = method
        self.url = url
        self.status = status
        self.message = message
        self.body = body


class PoolAsleepError(HTTPStatusError):
    """503 because every worker released its GPU memory: call `wake()` first."""


class RefitError(DsrouterError):
    """A refit that not every targeted worker confirmed.

    The router keeps routing only to workers on the pool's version and catches the others
    up in the background, so a trainer may carry on; but it should know, because capacity is
    reduced (or, if nobody confirmed, the pool still serves the old weights).
    `failed` maps each worker URL to what went wrong there.
    """

    def __init__(self, result: RefitResult) -> None:
        self.result = result
        self.failed = result.failed
        names = "; ".join(f"{url}: {reason}" for url, reason in self.failed.items())
        confirmed = sum(1 for r in result.results if r.ok)
        text = (
            f"refit failed on {len(self.failed)} worker(s) ({confirmed}/"
            f"{len(result.results)} confirmed, pool version {result.version}): {names}"
        )
        if result.message:
            text += f" ({result.message})"
        super().__init__(text)


# ---- results -----------------------------------------------------------------------------


@attrs.frozen
class ImageResult:
    """One image generation: decoded image bytes (b64_json) and/or URLs, and who served it."""

    id: str | None
    images: list[bytes]
    urls: list[str]
    worker: str | None
    """`host:port` of the worker that served it (the router's `x-dsrouter-worker` header)."""
    raw: dict[str, Any] = attrs.field(repr=False)


@attrs.frozen
class WorkerResult:
    """One worker's answer to a broadcast control call."""

    worker_url: str
    status_code: int | None
    body: Any
    error: str | None = None
    """Set when the worker gave no answer (unreachable, timed out)."""

    @property
    def ok(self) -> bool:
        """200, and not a body saying `"success": false` (same rule as the router's)."""
        if self.status_code != 200:
            return False
        return not (isinstance(self.body, dict) and self.body.get("success") is False)

    @property
    def reason(self) -> str:
        if self.error:
            return self.error
        body = self.body
        message = (
            body.get("message") or body.get("detail") or body.get("error")
            if isinstance(body, dict)
            else body
        )
        return f"{self.status_code}: {str(message)[:200]}"

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> WorkerResult:
        return cls(
            entry.get("worker_url", "?"),
            entry.get("status_code"),
            entry.get("body"),
            entry.get("error"),
        )


@attrs.frozen
class BroadcastResult:
    """The answer to sleep/wake: one result per targeted worker, or a message if none was."""

    results: list[WorkerResult]
    message: str | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> BroadcastResult:
        return cls(
            [WorkerResult.from_json(r) for r in body.get("results", [])], body.get("message")
        )


@attrs.frozen
class RefitResult:
    """The answer to a refit: the pool's weight version afterwards and who is behind."""

    success: bool
    version: str | None
    results: list[WorkerResult]
    stale_workers: list[str]
    """Workers not routable until they catch up to `version` (the router retries them)."""
    message: str | None = None

    @property
    def failed(self) -> dict[str, str]:
        """Worker URL → reason, for every worker that did not end up on `version`."""
        failed = {r.worker_url: r.reason for r in self.results if not r.ok}
        for url in self.stale_workers:
            failed.setdefault(url, "stale: not on the pool's weight version")
        return failed

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> RefitResult:
        results = [WorkerResult.from_json(r) for r in body.get("results", [])]
        success = body.get("success")
        if not isinstance(success, bool):
            success = all(r.ok for r in results)
        return cls(
            success,
            body.get("version"),
            results,
            list(body.get("stale_workers", [])),
            body.get("message"),
        )


@attrs.frozen
class WorkerInfo:
    """One worker as `GET /workers` describes it."""

    url: str
    worker_id: str
    display_id: str
    state: str
    active_requests: int
    consecutive_failures: int
    is_dead: bool
    is_sleeping: bool
    is_draining: bool
    is_stale: bool
    weight_version: str | None
    video_support: bool | None
    seconds_per_unit: float | None
    last_error: str | None
    raw: dict[str, Any] = attrs.field(repr=False)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerInfo:
        """Tolerant of missing fields, so it also reads the Miles/sglang-d-router shape."""
        is_dead = bool(data.get("is_dead", False))
        return cls(
            url=data["url"],
            worker_id=data.get("worker_id", worker_id_for(data["url"])),
            display_id=data.get("display_id", data["url"]),
            state=data.get("state") or ("dead" if is_dead else "healthy"),
            active_requests=int(data.get("active_requests", 0)),
            consecutive_failures=int(data.get("consecutive_failures", 0)),
            is_dead=is_dead,
            is_sleeping=bool(data.get("is_sleeping", False)),
            is_draining=bool(data.get("is_draining", False)),
            is_stale=bool(data.get("is_stale", False)),
            weight_version=data.get("weight_version"),
            video_support=data.get("video_support"),
            seconds_per_unit=data.get("seconds_per_unit"),
            last_error=data.get("last_error"),
            raw=data,
        )


@attrs.frozen
class PoolHealth:
    """`GET /health`: answered 200 when a worker is routable, 503 otherwise; both parse."""

    status: str
    """"healthy", "unhealthy", or "draining" while the router shuts down."""
    healthy_workers: int
    total_workers: int
    dead_workers: int
    sleeping_workers: int
    draining_workers: int
    stale_workers: int
    in_flight: int
    queued: int
    target_version: str | None = None
    """The weights every routable worker must hold (None until the first refit)."""
    pool_sleeping: bool = False

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolHealth:
        def count(key: str) -> int:
            return int(data.get(key) or 0)

        return cls(
            str(data.get("status", "unknown")),
            count("healthy_workers"),
            count("total_workers"),
            count("dead_workers"),
            count("sleeping_workers"),
            count("draining_workers"),
            count("stale_workers"),
            count("in_flight"),
            count("queued"),
            data.get("target_version"),
            bool(data.get("pool_sleeping")),
        )


# ---- the calls, described once -----------------------------------------------------------


@attrs.frozen
class _Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    json: Any = None
    admin: bool = True
    """Admin routes send the admin token; inference routes the API key."""


def _error_message(body: Any, text: str) -> str:
    if isinstance(body, dict):
        for key in ("error", "detail", "message"):
            if body.get(key):
                value = body[key]
                return value if isinstance(value, str) else str(value)
    return text.strip()[:500] or "(empty body)"


def _json_or_text(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def _raise_for_status(response: httpx.Response, ok: tuple[int, ...] = (200,)) -> None:
    """Raise the matching error unless the status is one of `ok`."""
    if response.status_code in ok:
        return
    body = _json_or_text(response)
    message = _error_message(body, response.text)
    cls = HTTPStatusError
    if response.status_code == 503 and "asleep" in message:
        cls = PoolAsleepError
    raise cls(
        response.request.method, str(response.request.url), response.status_code, message, body
    )


def _json(response: httpx.Response) -> Any:
    _raise_for_status(response)
    try:
        return response.json()
    except ValueError:
        raise HTTPStatusError(
            response.request.method,
            str(response.request.url),
            response.status_code,
            "answer is not JSON",
            response.text,
        ) from None


def _expect_ok(response: httpx.Response) -> None:
    _json(response)


def _parse_images(response: httpx.Response) -> ImageResult:
    body = _json(response)
    data = body.get("data") or []
    images = [base64.b64decode(item["b64_json"]) for item in data if item.get("b64_json")]
    urls = [item["url"] for item in data if item.get("url")]
    return ImageResult(
        body.get("id"), images, urls, response.headers.get("x-dsrouter-worker"), body
    )


def _parse_rollout(response: httpx.Response) -> list[dict[str, Any]]:
    _raise_for_status(response)
    samples = msgpack.unpackb(response.content, raw=False, strict_map_key=False)
    if not isinstance(samples, list):
        raise HTTPStatusError(
            response.request.method,
            str(response.request.url),
            response.status_code,
            "rollout answer is not a msgpack array",
            samples,
        )
    return samples


def _parse_refit(response: httpx.Response) -> RefitResult:
    # With `strict`, the router answers a partial refit 207 and a failed one 500, still
    # with the full answer; any other error (400, 503 ...) has no results to read.
    body = _json_or_text(response)
    if response.status_code in (207, 500) and isinstance(body, dict) and "results" in body:
        result = RefitResult.from_json(body)
    else:
        result = RefitResult.from_json(_json(response))
    if not result.success:
        raise RefitError(result)
    return result


def _parse_health(response: httpx.Response) -> PoolHealth:
    _raise_for_status(response, ok=(200, 503))
    body = _json_or_text(response)
    if not isinstance(body, dict):
        raise HTTPStatusError(
            response.request.method,
            str(response.request.url),
            response.status_code,
            "health answer is not a JSON object",
            body,
        )
    return PoolHealth.from_json(body)


def _worker_path(url: str) -> str:
    """`/workers/{worker_id}`; raises `ValueError` (InvalidWorkerURL) for a bad URL."""
    return "/workers/" + worker_id_for(normalize_worker_url(url))


class _Calls:
    """Every call as data; `Client` and `AsyncClient` only send them."""

    @staticmethod
    def generate_images(
        prompt: str, size: str | None, n: int, response_format: str, extra: dict[str, Any]
    ) -> _Call[ImageResult]:
        body = {"prompt": prompt, "n": n, "response_format": response_format, **extra}
        if size is not None:
            body["size"] = size
        return _Call("POST", "/v1/images/generations", _parse_images, body, admin=False)

    @staticmethod
    def rollout(prompt: str, seed: int, fields: dict[str, Any]) -> _Call[list[dict[str, Any]]]:
        return _Call(
            "POST",
            "/rollout/generate",
            _parse_rollout,
            {"prompt": prompt, "seed": seed, **fields},
            admin=False,
        )

    @staticmethod
    def refit(
        path: str,
        version: str | None,
        mode: str,
        verify_checksum: bool,
        drain_timeout_s: float | None,
        extra: dict[str, Any],
    ) -> _Call[RefitResult]:
        body: dict[str, Any] = {"model_path": path, "mode": mode, **extra}
        if version is not None:
            body["weight_version"] = version
        if verify_checksum:
            body["verify_checksum"] = True
        if drain_timeout_s is not None:
            body["drain_timeout_s"] = drain_timeout_s
        return _Call("POST", "/update_weights_from_disk", _parse_refit, body)

    @staticmethod
    def memory(path: str) -> _Call[BroadcastResult]:
        return _Call("POST", path, lambda r: BroadcastResult.from_json(_json(r)), {})

    @staticmethod
    def workers() -> _Call[list[WorkerInfo]]:
        return _Call(
            "GET", "/workers", lambda r: [WorkerInfo.from_json(w) for w in _json(r)["workers"]]
        )

    @staticmethod
    def managed_workers() -> _Call[list[dict[str, Any]]]:
        return _Call("GET", "/workers", lambda r: list(_json(r).get("managed_workers") or []))

    @staticmethod
    def queued_by_tenant() -> _Call[dict[str, int]]:
        return _Call("GET", "/workers", lambda r: dict(_json(r).get("queued_by_tenant") or {}))

    @staticmethod
    def health() -> _Call[PoolHealth]:
        return _Call("GET", "/health", _parse_health)

    @staticmethod
    def add_worker(url: str) -> _Call[WorkerInfo]:
        return _Call(
            "POST", "/workers", lambda r: WorkerInfo.from_json(_json(r)["worker"]), {"url": url}
        )

    @staticmethod
    def remove_worker(url: str) -> _Call[None]:
        return _Call("DELETE", _worker_path(url), _expect_ok)

    @staticmethod
    def set_draining(url: str, draining: bool, remove_when_drained: bool) -> _Call[WorkerInfo]:
        body = {"draining": draining, "remove_when_drained": remove_when_drained}
        return _Call(
            "PUT", _worker_path(url), lambda r: WorkerInfo.from_json(_json(r)["worker"]), body
        )


class _Base:
    def __init__(self, base_url: str, admin_token: str | None, api_key: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self._admin_token = (
            os.environ.get(ADMIN_TOKEN_ENV, "") if admin_token is None else admin_token
        )
        self._api_key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key

    def _headers(self, admin: bool) -> dict[str, str]:
        secret = self._admin_token if admin else (self._api_key or self._admin_token)
        return {"authorization": f"Bearer {secret}"} if secret else {}

    def _unreachable(self, exc: httpx.TransportError) -> RouterUnreachableError:
        if isinstance(exc, httpx.TimeoutException):
            what = f"no answer in time ({type(exc).__name__})"
        else:
            what = str(exc) or type(exc).__name__
        return RouterUnreachableError(f"cannot reach the router at {self.base_url}: {what}")


def _timeout(seconds: float) -> httpx.Timeout:
    return httpx.Timeout(seconds, connect=min(seconds, 10.0))


class Client(_Base):
    """Blocking client. Use as a context manager, or call `close()`.

    `admin_token` defaults to `$DSROUTER_ADMIN_TOKEN` and `api_key` to `$DSROUTER_API_KEY`
    (pass "" to send none). `timeout` bounds each call, in seconds; keep it above the
    router's drain timeout for refits.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        admin_token: str | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(base_url, admin_token, api_key)
        self._http = httpx.Client(base_url=self.base_url, timeout=_timeout(timeout))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _send(self, call: _Call[T]) -> T:
        try:
            response = self._http.request(
                call.method, call.path, json=call.json, headers=self._headers(call.admin)
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return call.parse(response)

    def generate_images(
        self,
        prompt: str,
        *,
        size: str | None = None,
        n: int = 1,
        response_format: str = "b64_json",
        **extra: Any,
    ) -> ImageResult:
        """`POST /v1/images/generations`; `extra` goes into the body as is (seed, steps...).

        `size` None keeps the worker's default (1024x1024 on sglang).
        """
        return self._send(_Calls.generate_images(prompt, size, n, response_format, extra))

    def rollout(self, prompt: str, *, seed: int, **fields: Any) -> list[dict[str, Any]]:
        """`POST /rollout/generate`: one decoded msgpack map per sample.

        `seed` is required because the worker fails a rollout without one only after doing
        the GPU work. Tensors stay in the worker's encoding, `{"__tensor__": True, "data":
        <safetensors bytes>, "shape", "dtype"}`, so this module needs no torch.
        """
        return self._send(_Calls.rollout(prompt, seed, fields))

    def refit(
        self,
        path: str,
        *,
        version: str | None = None,
        mode: str = "drain",
        verify_checksum: bool = False,
        drain_timeout_s: float | None = None,
        **extra: Any,
    ) -> RefitResult:
        """Load new weights on every active worker (`POST /update_weights_from_disk`).

        `version` names the weights (default: `path`); `mode="drain"` lets in-flight
        requests finish first, `"immediate"` does not wait. `extra` reaches the workers
        (`flush_cache`, `target_modules`). Raises `RefitError` unless every worker
        confirmed.
        """
        return self._send(
            _Calls.refit(path, version, mode, verify_checksum, drain_timeout_s, extra)
        )

    def sleep(self) -> BroadcastResult:
        """Release the pool's GPU memory (for training); requests get `PoolAsleepError`."""
        return self._send(_Calls.memory("/release_memory_occupation"))

    def wake(self) -> BroadcastResult:
        """Take the GPU memory back; workers that missed a refit catch up on waking."""
        return self._send(_Calls.memory("/resume_memory_occupation"))

    def workers(self) -> list[WorkerInfo]:
        return self._send(_Calls.workers())

    def managed_workers(self) -> list[dict[str, Any]]:
        """The launcher's slots in any state (starting, ready, backoff, failed, stopped):
        a failed worker is out of `workers()`, not out of this. [] without a launcher."""
        return self._send(_Calls.managed_workers())

    def queued_by_tenant(self) -> dict[str, int]:
        """Requests waiting in the router queue, per tenant."""
        return self._send(_Calls.queued_by_tenant())

    def health(self) -> PoolHealth:
        """The pool summary; an unhealthy pool (503) is an answer, not an error."""
        return self._send(_Calls.health())

    def add_worker(self, url: str) -> WorkerInfo:
        return self._send(_Calls.add_worker(url))

    def remove_worker(self, url: str) -> None:
        self._send(_Calls.remove_worker(url))

    def set_draining(
        self, url: str, draining: bool = True, *, remove_when_drained: bool = False
    ) -> WorkerInfo:
        """Take a worker out of rotation (or back in); in-flight requests finish."""
        return self._send(_Calls.set_draining(url, draining, remove_when_drained))


class AsyncClient(_Base):
    """The async twin of `Client` (same methods, awaited); works under asyncio and trio."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        *,
        admin_token: str | None = None,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        super().__init__(base_url, admin_token, api_key)
        self._http = httpx.AsyncClient(base_url=self.base_url, timeout=_timeout(timeout))

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _send(self, call: _Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method, call.path, json=call.json, headers=self._headers(call.admin)
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return call.parse(response)

    async def generate_images(
        self,
        prompt: str,
        *,
        size: str | None = None,
        n: int = 1,
        response_format: str = "b64_json",
        **extra: Any,
    ) -> ImageResult:
        """See `Client.generate_images`."""
        return await self._send(_Calls.generate_images(prompt, size, n, response_format, extra))

    async def rollout(self, prompt: str, *, seed: int, **fields: Any) -> list[dict[str, Any]]:
        """See `Client.rollout`."""
        return await self._send(_Calls.rollout(prompt, seed, fields))

    async def refit(
        self,
        path: str,
        *,
        version: str | None = None,
        mode: str = "drain",
        verify_checksum: bool = False,
        drain_timeout_s: float | None = None,
        **extra: Any,
    ) -> RefitResult:
        """See `Client.refit`."""
        return await self._send(
            _Calls.refit(path, version, mode, verify_checksum, drain_timeout_s, extra)
        )

    async def sleep(self) -> BroadcastResult:
        """See `Client.sleep`."""
        return await self._send(_Calls.memory("/release_memory_occupation"))

    async def wake(self) -> BroadcastResult:
        """See `Client.wake`."""
        return await self._send(_Calls.memory("/resume_memory_occupation"))

    async def workers(self) -> list[WorkerInfo]:
        return await self._send(_Calls.workers())

    async def managed_workers(self) -> list[dict[str, Any]]:
        """See `Client.managed_workers`."""
        return await self._send(_Calls.managed_workers())

    async def health(self) -> PoolHealth:
        """See `Client.health`."""
        return await self._send(_Calls.health())

    async def add_worker(self, url: str) -> WorkerInfo:
        return await self._send(_Calls.add_worker(url))

    async def remove_worker(self, url: str) -> None:
        await self._send(_Calls.remove_worker(url))

    async def set_draining(
        self, url: str, draining: bool = True, *, remove_when_drained: bool = False
    ) -> WorkerInfo:
        """See `Client.set_draining`."""
        return await self._send(_Calls.set_draining(url, draining, remove_when_drained))
