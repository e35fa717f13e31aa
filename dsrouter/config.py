"""Configuration: frozen attrs classes, one cattrs converter, TOML/YAML loading, CLI overrides.

Validation lives in the types: constrained values are `NewType`s whose structure hooks raise
`ValueError("expected ...")`, so `cattrs.transform_error` can report every problem with its key
path (`health.interval_s: expected a number > 0, got 'ten'`). Nothing else validates config.
Tables, lists and mappings are checked for their shape before cattrs looks inside them: cattrs
itself turns any iterable into a list, so `api_keys = "abc"` would become `["a", "b", "c"]`.

Secret fields carry `metadata=SECRET`; `dump_config` masks them, and the secret-looking
arguments of command lines (`metadata=ARGV`: `--api-key X`, `--hf-token=X`), so nothing
that prints the effective configuration can leak a token.

`load` reads the secret sources (`admin_token_env`, `admin_token_file`, `api_keys_file`)
once, at load time, for start-up, `check-config` and reload alike: a configured source that
is unset, empty or unreadable is a `ConfigError`, never "no auth".
"""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, NewType, get_args, get_origin
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.errors import ForbiddenExtraKeysError, IterableValidationError, IterableValidationNote

from dsrouter.urls import InvalidWorkerURL, normalize_worker_url

PositiveFloat = NewType("PositiveFloat", float)
NonNegativeFloat = NewType("NonNegativeFloat", float)
PositiveInt = NewType("PositiveInt", int)
NonNegativeInt = NewType("NonNegativeInt", int)
Port = NewType("Port", int)
PortStride = NewType("PortStride", int)
Percent = NewType("Percent", int)
WorkerURL = NewType("WorkerURL", str)
NetworkEntry = NewType("NetworkEntry", str)
GpuGroup = NewType("GpuGroup", list[str])
ShellArgs = NewType("ShellArgs", list[str])
Command = NewType("Command", list[str])
Ratio = NewType("Ratio", float)
OtlpEndpoint = NewType("OtlpEndpoint", str)

RoutingAlgorithm = Literal["least-work", "least-request", "round-robin", "random"]
LogLevel = Literal["trace", "debug", "info", "warning", "error", "critical"]
"""`trace` is sglang-d-router's (uvicorn's) most verbose level; the router has nothing finer
than DEBUG, so it logs as `debug` does (`logs.setup_logging`)."""
LogFormat = Literal["text", "json"]
RestartPolicy = Literal["never", "on-failure", "always"]
WhenBusy = Literal["refuse", "wait"]
OtlpProtocol = Literal["http/protobuf"]

SECRET = {"secret": True}
"""Field metadata: the value is masked by `dump_config` (a `dict` field: values whose name
looks like a credential, see `_SECRET_NAME`)."""
ARGV = {"argv": True}
SECRET_VALUES = {"secret_values": True}
"""Field metadata (a `dict` field): every value is masked by `dump_config`, whatever its
name (OTLP headers carry credentials under names like `Authorization` or `x-api-team`)."""
"""Field metadata: a command line; `dump_config` masks the values of secret flags in it."""


@attrs.frozen
class ServerConfig:
    host: str = "0.0.0.0"
    port: Port = Port(30080)
    max_connections: PositiveInt = PositiveInt(1000)
    request_timeout_s: PositiveFloat = PositiveFloat(1800.0)
    connect_timeout_s: PositiveFloat = PositiveFloat(5.0)
    drain_timeout_s: NonNegativeFloat = NonNegativeFloat(30.0)
    keep_alive_timeout_s: PositiveFloat = PositiveFloat(30.0)
    max_body_mb: PositiveInt = PositiveInt(8192)
    max_control_body_mb: PositiveInt = PositiveInt(64)
    """Largest RL control body (buffered whole): update_weights_from_tensor carries tensors."""
    max_header_kb: PositiveInt = PositiveInt(64)
    body_idle_timeout_s: PositiveFloat = PositiveFloat(60.0)
    body_min_rate_kb_s: NonNegativeFloat = NonNegativeFloat(16.0)
    """An upload must average this many KiB/s once `body_rate_grace_s` have passed (0: off)."""
    body_rate_grace_s: NonNegativeFloat = NonNegativeFloat(10.0)
    max_buffered_mb: PositiveInt = PositiveInt(512)
    """Request bodies kept in memory for replay, over all requests together."""
    metrics_port: Port = Port(0)


@attrs.frozen
class TimeoutsConfig:
    job_s: PositiveFloat = PositiveFloat(300.0)
    content_s: PositiveFloat = PositiveFloat(300.0)
    control_s: PositiveFloat = PositiveFloat(1800.0)
    idle_read_s: PositiveFloat = PositiveFloat(600.0)
    discovery_s: PositiveFloat = PositiveFloat(10.0)


@attrs.frozen
class RoutingConfig:
    algorithm: RoutingAlgorithm = "least-work"
    max_inflight_per_worker: NonNegativeInt = NonNegativeInt(0)
    queue_size: NonNegativeInt = NonNegativeInt(1024)
    queue_timeout_s: PositiveFloat = PositiveFloat(600.0)
    queue_while_asleep: bool = False
    max_attempts: PositiveInt = PositiveInt(3)
    retry_buffer_mb: NonNegativeInt = NonNegativeInt(16)
    retry_backoff_s: NonNegativeFloat = NonNegativeFloat(0.05)
    max_jobs: PositiveInt = PositiveInt(100_000)
    match_model: bool = True
    """Send a request naming a `model` only to workers serving it (404 when none does).
    False: ignore the field, as sglang-d-router did (workers do not check it either)."""


@attrs.frozen
class ModelCost:
    """Defaults of one model (`cost.models`), used when its request does not say; unset ones
    fall back to the `[cost]` defaults. These are the keys `CostModel.from_params` reads."""

    width: PositiveInt | None = None
    height: PositiveInt | None = None
    steps: PositiveInt | None = None


ModelCosts = NewType("ModelCosts", dict[str, ModelCost])


@attrs.frozen
class CostConfig:
    default_steps: PositiveInt = PositiveInt(30)
    image_width: PositiveInt = PositiveInt(1024)
    image_height: PositiveInt = PositiveInt(1024)
    video_width: PositiveInt = PositiveInt(832)
    video_height: PositiveInt = PositiveInt(480)
    video_seconds: PositiveFloat = PositiveFloat(4.0)
    video_fps: PositiveFloat = PositiveFloat(24.0)
    default_seconds_per_unit: PositiveFloat = PositiveFloat(0.01)
    models: ModelCosts = attrs.Factory(lambda: ModelCosts({}))


@attrs.frozen
class HealthConfig:
    interval_s: PositiveFloat = PositiveFloat(10.0)
    timeout_s: PositiveFloat = PositiveFloat(5.0)
    failure_threshold: PositiveInt = PositiveInt(3)
    recovery_threshold: PositiveInt = PositiveInt(2)
    breaker_open_s: PositiveFloat = PositiveFloat(15.0)
    max_ejection_percent: Percent = Percent(50)
    """Failed requests may take at most this share of the workers out of rotation."""


@attrs.frozen
class StaticWorker:
    url: WorkerURL
    api_key: str = attrs.field(default="", metadata=SECRET)


@attrs.frozen
class RayLauncherConfig:
    """Where `backend = "ray"` runs its workers (`launcher.ray`); unused by the local one."""

    address: str = ""
    """`""` starts a local Ray cluster owned by the router; `"auto"`, `"HOST:PORT"` or
    `"ray://HOST:10001"` join an existing one."""
    namespace: str = "dsrouter"
    """Ray namespace of the actors and placement groups; two routers sharing a cluster need
    two namespaces."""
    detach: bool = False
    """Keep the actors (and their servers) running when the router stops, so the next router
    with this namespace re-attaches to them instead of loading the models again."""


@attrs.frozen
class LauncherConfig:
    backend: Literal["local", "ray"] = "local"
    model: str = ""
    num_workers: NonNegativeInt = NonNegativeInt(0)
    num_gpus_per_worker: NonNegativeInt = NonNegativeInt(1)
    gpu_ids: list[GpuGroup] = attrs.Factory(list)
    worker_host: str = "127.0.0.1"
    worker_base_port: Port = Port(10090)
    port_stride: PortStride = PortStride(2)
    master_port_base: Port = Port(30005)
    scheduler_port_base: Port = Port(5555)
    internal_port_stride: PositiveInt = PositiveInt(1000)
    """sglang-d-router's default: room for `--dp-size` replicas, one scheduler port each."""
    scan_ports: bool = False
    """Move a busy planned port to the next free one (sglang-d-router did, always) instead
    of refusing to start."""
    extra_args: ShellArgs = attrs.field(factory=lambda: ShellArgs([]), metadata=ARGV)
    env: dict[str, str] = attrs.field(factory=dict, metadata=SECRET)
    command: Command = attrs.field(factory=lambda: Command(["sglang", "serve"]), metadata=ARGV)
    wait_timeout_s: PositiveFloat = PositiveFloat(600.0)
    restart: RestartPolicy = "on-failure"
    max_restarts: NonNegativeInt = NonNegativeInt(5)
    restart_window_s: PositiveFloat = PositiveFloat(600.0)
    backoff_initial_s: PositiveFloat = PositiveFloat(1.0)
    backoff_max_s: PositiveFloat = PositiveFloat(60.0)
    stop_timeout_s: PositiveFloat = PositiveFloat(30.0)
    log_dir: str = ""
    log_max_mb: PositiveInt = PositiveInt(64)
    log_prefix: str = ""
    """Put before every worker output line in the router's log (not in `log_dir` files)."""
    ray: RayLauncherConfig = attrs.Factory(RayLauncherConfig)


@attrs.frozen
class ApiKey:
    """One `[[security.keys]]` entry: a key, the tenant it speaks for, and the tenant's
    class and limits (0 = no limit). The keys of one tenant share its limits and state, so
    they must agree on them."""

    tenant: str
    key: str = attrs.field(default="", metadata=SECRET)
    key_env: str = ""
    key_file: str = ""
    priority_class: str = ""
    """"" = `tenants.default_class`."""
    weight: PositiveFloat = PositiveFloat(1.0)
    requests_per_s: NonNegativeFloat = NonNegativeFloat(0.0)
    burst: NonNegativeInt = NonNegativeInt(0)
    """Requests the bucket holds (0 = one second's worth, at least 1)."""
    max_concurrent: NonNegativeInt = NonNegativeInt(0)
    cost_per_minute: NonNegativeFloat = NonNegativeFloat(0.0)
    """GPU work per minute in the cost model's units (megapixel-steps)."""

    def limits(self) -> tuple[object, ...]:
        """What the keys of one tenant must agree on."""
        return (
            self.priority_class,
            self.weight,
            self.requests_per_s,
            self.burst,
            self.max_concurrent,
            self.cost_per_minute,
        )


@attrs.frozen
class TenantsConfig:
    classes: list[str] = attrs.Factory(lambda: ["system", "interactive", "default", "bulk"])
    """Priority classes, highest first."""
    default_class: str = "default"
    aging_s: NonNegativeFloat = NonNegativeFloat(30.0)
    """Each this many seconds of waiting raises a queued request one class (0 = never)."""
    replicas: PositiveInt = PositiveInt(1)
    """Router replicas sharing the keys: each enforces 1/replicas of every limit."""


@attrs.frozen
class SecurityConfig:
    """Who may call what. After `load`, `admin_token` and `api_keys` are the effective
    secrets: the token from its file, else its variable, else the literal; the keys listed
    plus those of `api_keys_file`. Nothing reads the `_env`/`_file` sources after that."""

    admin_token: str = attrs.field(default="", metadata=SECRET)
    admin_token_env: str = ""
    admin_token_file: str = ""
    api_keys: list[str] = attrs.field(factory=list, metadata=SECRET)
    api_keys_file: str = ""
    keys: list[ApiKey] = attrs.Factory(list)
    forward_authorization: bool = False
    worker_api_key: str = attrs.field(default="", metadata=SECRET)
    protect_metrics: bool = False
    allowed_worker_networks: list[NetworkEntry] = attrs.Factory(list)


@attrs.frozen
class LoggingConfig:
    level: LogLevel = "info"
    format: LogFormat = "text"
    access_log: bool = True
    access_log_exclude: list[str] = attrs.Factory(lambda: ["/health", "/metrics", "/status"])
    """Paths polled by load balancers, scrapers and the status page: counted in metrics, not
    logged, and left out of the status page's charts."""


@attrs.frozen
class RealtimeConfig:
    """WebSocket sessions (`realtime.py`) and job progress events (`events.py`)."""

    when_busy: WhenBusy = "refuse"
    wait_s: NonNegativeFloat = NonNegativeFloat(10.0)
    idle_timeout_s: PositiveFloat = PositiveFloat(300.0)
    max_lifetime_s: PositiveFloat = PositiveFloat(3600.0)
    max_message_mb: PositiveInt = PositiveInt(16)
    events_poll_s: PositiveFloat = PositiveFloat(1.0)


@attrs.frozen
class TracingConfig:
    """OpenTelemetry traces (`dsrouter.tracing`), exported over OTLP/HTTP; off without an
    `endpoint`. Read at start-up only: a reload that changes it says it needs a restart
    (the exporter's thread and the sampler are built once)."""

    endpoint: OtlpEndpoint = OtlpEndpoint("")
    """The collector's OTLP/HTTP URL (`http://collector:4318`); spans go to
    `/v1/traces` under it unless the URL has a path of its own. `""`: tracing off."""
    protocol: OtlpProtocol = "http/protobuf"
    sample_ratio: Ratio = Ratio(1.0)
    """Share of new traces recorded; a request that brings a `traceparent` follows its
    caller's decision (parent-based)."""
    service_name: str = "dsrouter"
    headers: dict[str, str] = attrs.field(factory=dict, metadata=SECRET_VALUES)
    """Sent with every export (a collector's credentials)."""
    timeout_s: PositiveFloat = PositiveFloat(10.0)


@attrs.frozen
class Config:
    server: ServerConfig = attrs.Factory(ServerConfig)
    timeouts: TimeoutsConfig = attrs.Factory(TimeoutsConfig)
    routing: RoutingConfig = attrs.Factory(RoutingConfig)
    cost: CostConfig = attrs.Factory(CostConfig)
    health: HealthConfig = attrs.Factory(HealthConfig)
    workers: list[StaticWorker] = attrs.Factory(list)
    launcher: LauncherConfig = attrs.Factory(LauncherConfig)
    security: SecurityConfig = attrs.Factory(SecurityConfig)
    tenants: TenantsConfig = attrs.Factory(TenantsConfig)
    logging: LoggingConfig = attrs.Factory(LoggingConfig)
    realtime: RealtimeConfig = attrs.Factory(RealtimeConfig)
    tracing: TracingConfig = attrs.Factory(TracingConfig)


class ConfigError(Exception):
    """One or more configuration problems, each a line naming the source and the key path."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number_hook(kind: type, minimum: float, strict: bool, what: str) -> Any:
    def structure(value: Any, _: Any) -> Any:
        ok_type = (
            _is_number(value)
            if kind is float
            else isinstance(value, int) and not isinstance(value, bool)
        )
        if not ok_type or (value <= minimum if strict else value < minimum):
            raise ValueError(f"expected {what}, got {value!r}")
        return kind(value)

    return structure


def _strict_hook(kind: type, what: str) -> Any:
    def structure(value: Any, _: Any) -> Any:
        if type(value) is not kind and not (kind is float and _is_number(value)):
            raise ValueError(f"expected {what}, got {value!r}")
        return kind(value)

    return structure


def _port(value: Any, _: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 65535:
        raise ValueError(f"expected a port number 0..65535, got {value!r}")
    return value


def _percent(value: Any, _: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 100:
        raise ValueError(f"expected a percentage 0..100, got {value!r}")
    return value


def _ratio(value: Any, _: Any) -> float:
    if not _is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"expected a number 0..1, got {value!r}")
    return float(value)


def _otlp_endpoint(value: Any, _: Any) -> str:
    """An http(s) URL with a host; a trailing slash is dropped (`tracing.otlp_traces_url`
    appends `/v1/traces` to a bare origin)."""
    if value == "":
        return value
    if isinstance(value, str):
        parts = urlsplit(value)
        if parts.scheme in ("http", "https") and parts.hostname and not parts.query:
            return value.rstrip("/")
    raise ValueError(
        f"expected an http(s) URL of an OTLP/HTTP collector like 'http://localhost:4318', "
        f"got {value!r}"
    )


def _worker_url(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a worker URL string, got {value!r}")
    try:
        return normalize_worker_url(value)
    except InvalidWorkerURL as exc:
        raise ValueError(f"expected a worker URL: {exc}") from None


_GPU_ID = re.compile(r"[^\s,]+")
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")


def _gpu_group(value: Any, _: Any) -> list[str]:
    """The GPUs of one worker. Besides a list, the forms sglang-d-router's YAML uses: an
    integer (`3`) or a comma-separated string (`"1,2"`)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return [str(value)]
    ids: list[str] = []
    if isinstance(value, str):
        ids = [part.strip() for part in value.split(",")]
    elif isinstance(value, list) and all(
        isinstance(x, str) or (type(x) is int and x >= 0) for x in value
    ):
        ids = [str(x).strip() for x in value]
    if not ids or not all(_GPU_ID.fullmatch(i) for i in ids):
        raise ValueError(
            'expected the GPU ids of one worker: a list like ["0", "1"], a string '
            f'like "0,1" or an integer, got {value!r}'
        )
    return ids


def _network_entry(value: Any, _: Any) -> str:
    """A CIDR or a host name: an entry like `10.0.0.0/33` must not pass as a name that
    never matches."""
    if isinstance(value, str):
        try:
            ipaddress.ip_network(value, strict=False)
        except ValueError:
            if _HOST_NAME.fullmatch(value):
                return value
        else:
            return value
    raise ValueError(f"expected a CIDR like '10.0.0.0/8' or a host name, got {value!r}")


_STRUCTURE_ERRORS = (cattrs.BaseValidationError, cattrs.errors.CattrsError, ValueError, TypeError)
_NOUNS: dict[Any, str] = {
    str: "strings",
    NetworkEntry: "CIDRs or host names",
    GpuGroup: "GPU id lists, one per worker",
}


def _noun(type_: Any) -> str:
    """What a list or table holds, for the "expected a list of ..." messages."""
    if type_ in _NOUNS:
        return _NOUNS[type_]
    if attrs.has(type_) or get_origin(type_) is dict:
        return "tables"
    if get_origin(type_) is list:
        return "lists"
    return getattr(type_, "__name__", str(type_))


def _structure_items(
    conv: cattrs.Converter, items: Iterable[tuple[Any, Any, Any]], whole: Any
) -> list[Any]:
    """Structure each `(index, value, type)`; report every failure at once, each under its
    index or key, the way cattrs's own collection hooks do for `transform_error`."""
    results, errors = [], []
    for index, value, type_ in items:
        try:
            results.append(conv.structure(value, type_))
        except _STRUCTURE_ERRORS as exc:
            note = IterableValidationNote(f"item @ {index!r}", index, type_)
            exc.__notes__ = [*getattr(exc, "__notes__", []), note]
            errors.append(exc)
    if errors:
        raise IterableValidationError(f"While structuring {whole!r}", errors, whole)
    return results


def _shape_hooks(conv: cattrs.Converter) -> None:
    """Reject a value of the wrong shape before cattrs iterates it: its own hooks turn a
    string into a list of characters and fail on a number with a Python error."""

    def table(cl: type) -> Callable[[Any, Any], Any]:
        inner = conv.gen_structure_attrs_fromdict(cl)

        def structure(value: Any, type_: Any) -> Any:
            if not isinstance(value, dict):
                raise ValueError(f"expected a table, got {value!r}")
            return inner(value, type_)

        return structure

    def mapping(type_: Any) -> Callable[[Any, Any], Any]:
        key_type, value_type = get_args(type_) or (Any, Any)
        noun = _noun(value_type)

        def structure(value: Any, type_: Any) -> dict[Any, Any]:
            if not isinstance(value, dict):
                raise ValueError(f"expected a table of {noun}, got {value!r}")
            keys = _structure_items(conv, ((k, k, key_type) for k in value), type_)
            values = _structure_items(conv, ((k, v, value_type) for k, v in value.items()), type_)
            return dict(zip(keys, values, strict=True))

        return structure

    def sequence(type_: Any) -> Callable[[Any, Any], Any]:
        (item_type,) = get_args(type_) or (Any,)
        noun = _noun(item_type)

        def structure(value: Any, type_: Any) -> list[Any]:
            if not isinstance(value, list):
                raise ValueError(f"expected a list of {noun}, got {value!r}")
            return _structure_items(
                conv, ((i, item, item_type) for i, item in enumerate(value)), type_
            )

        return structure

    conv.register_structure_hook_factory(attrs.has, table)
    conv.register_structure_hook_factory(lambda t: get_origin(t) is dict, mapping)
    conv.register_structure_hook_factory(lambda t: get_origin(t) is list, sequence)

    def shell_args(value: Any, _: Any) -> list[str]:
        if isinstance(value, str):
            try:
                return shlex.split(value)
            except ValueError as exc:
                raise ValueError(f"expected a shell string ({exc}), got {value!r}") from None
        if not isinstance(value, list):
            raise ValueError(f"expected a list of strings or one shell string, got {value!r}")
        return conv.structure(value, list[str])

    def command(value: Any, _: Any) -> list[str]:
        args = conv.structure(value, list[str])
        if not args or not args[0]:
            raise ValueError(
                "expected a non-empty list of strings (the program, then its "
                f"arguments), got {value!r}"
            )
        return args

    def model_costs(value: Any, _: Any) -> dict[str, ModelCost]:
        if not isinstance(value, dict):
            raise ValueError(f"expected a table of model names to tables, got {value!r}")
        return conv.structure(value, dict[str, ModelCost])

    conv.register_structure_hook(ShellArgs, shell_args)
    conv.register_structure_hook(Command, command)
    conv.register_structure_hook(ModelCosts, model_costs)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True)
    _shape_hooks(conv)
    conv.register_structure_hook(PositiveFloat, _number_hook(float, 0, True, "a number > 0"))
    conv.register_structure_hook(NonNegativeFloat, _number_hook(float, 0, False, "a number >= 0"))
    conv.register_structure_hook(PositiveInt, _number_hook(int, 0, True, "an integer > 0"))
    conv.register_structure_hook(NonNegativeInt, _number_hook(int, 0, False, "an integer >= 0"))
    conv.register_structure_hook(PortStride, _number_hook(int, 2, False, "an integer >= 2"))
    conv.register_structure_hook(Port, _port)
    conv.register_structure_hook(Percent, _percent)
    conv.register_structure_hook(Ratio, _ratio)
    conv.register_structure_hook(OtlpEndpoint, _otlp_endpoint)
    conv.register_structure_hook(WorkerURL, _worker_url)
    conv.register_structure_hook(NetworkEntry, _network_entry)
    conv.register_structure_hook(GpuGroup, _gpu_group)
    conv.register_structure_hook(str, _strict_hook(str, "a string"))
    conv.register_structure_hook(int, _strict_hook(int, "an integer"))
    conv.register_structure_hook(float, _strict_hook(float, "a number"))
    conv.register_structure_hook(bool, _strict_hook(bool, "true or false"))
    return conv


converter = _make_converter()


def _format_exception(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, ForbiddenExtraKeysError):
        return "unknown key(s): " + ", ".join(sorted(exc.extra_fields))
    if isinstance(exc, ValueError) and str(exc).startswith("expected"):
        return str(exc)
    if isinstance(exc, KeyError):
        return "required key missing"
    if isinstance(exc, cattrs.errors.CattrsError) and "not in literal" in str(exc):
        choices = ", ".join(repr(a) for a in getattr(type_, "__args__", ()))
        return f"expected one of {choices}" if choices else str(exc)
    return f"invalid value ({exc})"


def _describe(line: str) -> tuple[str, str]:
    message, _, path = line.rpartition(" @ ")
    key = path.removeprefix("$").removeprefix(".")
    key = key.replace(".[", "[")
    return key, message


def read_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, turning I/O and syntax errors into a `ConfigError` naming the file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: invalid TOML: {exc}"]) from None


_YAML_LAUNCHER_KEYS = {
    "backend": "backend",
    "model": "model",
    "num_workers": "num_workers",
    "num_gpus_per_worker": "num_gpus_per_worker",
    "worker_host": "worker_host",
    "worker_base_port": "worker_base_port",
    "worker_gpu_ids": "gpu_ids",
    "worker_extra_args": "extra_args",
    "wait_timeout": "wait_timeout_s",
    "master_port_base": "master_port_base",
    "scheduler_port_base": "scheduler_port_base",
    "internal_port_stride": "internal_port_stride",
    "log_prefix": "log_prefix",
}
YAML_DEFAULTS = {"num_workers": 1}
"""sglang-d-router's defaults where they differ from `[launcher]`'s: its YAML launches one
worker when `num_workers` is left out (its minimal example relies on that), while a
router.toml without `[launcher]` launches none."""


def read_launcher_yaml(path: Path) -> dict[str, Any]:
    """Read sglang-d-router's launcher YAML and map its keys onto `[launcher]` keys.

    Unknown keys are passed through under their own name so the converter reports them with
    the YAML file as source. Its value forms (`worker_extra_args` as one shell string,
    `worker_gpu_ids` entries like `"1,2"` or `3`) are the types' own (`ShellArgs`, `GpuGroup`),
    so a TOML file may use them too.
    """
    import yaml

    try:
        with path.open("rb") as fh:
            doc = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read launcher config: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {exc}"]) from None
    if not isinstance(doc, dict) or not isinstance(doc.get("launcher"), dict):
        raise ConfigError([f"{path}: launcher: expected a mapping under the key 'launcher'"])
    mapped = {_YAML_LAUNCHER_KEYS.get(key, key): value for key, value in doc["launcher"].items()}
    return {**YAML_DEFAULTS, **mapped}


@attrs.frozen(init=False)
class Overrides:
    """Command-line flags that override the file (`FLAGS`); a flag not given is absent.

    Keyword arguments are the flags' names (`health_check_interval=5`); `None` means "not
    given", so argparse's namespace can be passed as it is.
    """

    values: dict[str, Any]

    def __init__(self, **given: Any) -> None:
        unknown = set(given) - {flag.dest for flag in FLAGS}
        if unknown:
            raise TypeError(f"unknown flags: {sorted(unknown)}")
        values = {name: value for name, value in given.items() if value is not None}
        self.__attrs_init__(values)  # type: ignore[attr-defined]


@attrs.frozen
class Flag:
    """One sglang-d-router flag of `run` / `check-config`: what it overrides, once."""

    dest: str
    path: tuple[str, str] | None
    """The router.toml key it sets; None for the two that are not one key."""
    type: Callable[[str], Any] | None
    help: str

    @property
    def option(self) -> str:
        return "--" + self.dest.replace("_", "-")


FLAGS = (
    Flag("host", ("server", "host"), None, "bind address (default 0.0.0.0)"),
    Flag("port", ("server", "port"), int, "bind port (default 30080)"),
    Flag("worker_urls", None, None, "static workers; replaces [[workers]] of the file"),
    Flag("max_connections", ("server", "max_connections"), int, "proxied requests at once"),
    Flag("timeout", ("server", "request_timeout_s"), float, "seconds a worker may take"),
    Flag("health_check_interval", ("health", "interval_s"), float, "seconds between probes"),
    Flag(
        "health_check_failure_threshold",
        ("health", "failure_threshold"),
        int,
        "failed probes that quarantine a worker",
    ),
    Flag(
        "routing_algorithm",
        ("routing", "algorithm"),
        None,
        " | ".join(get_args(RoutingAlgorithm))
        + f" (default {attrs.fields(RoutingConfig).algorithm.default})",
    ),
    Flag("launcher_config", None, Path, "sglang-d-router launcher YAML (launcher: ...)"),
    # Any case, as uvicorn took sglang-d-router's `--log-level WARNING`.
    Flag("log_level", ("logging", "level"), str.lower, " | ".join(get_args(LogLevel))),
)


@attrs.frozen
class LoadedConfig:
    """A loaded configuration and what its sources said in so many words.

    A reload needs the difference between a key left out (a truncated file) and a key set
    to empty on purpose (`api_keys = []`): both structure to the same `Config`.
    """

    config: Config
    source: str
    """The file the configuration came from, for messages ("(defaults)" without one)."""
    given: frozenset[str] = frozenset()
    """Key paths some source set: top-level keys (`workers`) and `section.key`."""


def load_config(path: Path | None, overrides: Overrides | None = None) -> Config:
    """The effective configuration (see `load`)."""
    return load(path, overrides).config


def load(path: Path | None, overrides: Overrides | None = None) -> LoadedConfig:
    """Load the effective configuration: file (optional), then launcher YAML, then flags.

    The sources are merged into one mapping and structured once; each problem is reported
    against the source that supplied its key (the TOML file, the YAML file, or `--flag`).
    Then the secret sources are read (`resolve_secrets`).
    """
    overrides = overrides or Overrides()
    raw: dict[str, Any] = read_toml(path) if path is not None else {}
    sources: dict[str, str] = {}
    launcher_config = overrides.values.get("launcher_config")
    if launcher_config is not None:
        launcher_raw = read_launcher_yaml(launcher_config)
        section = raw.setdefault("launcher", {})
        if not isinstance(section, dict):
            section = raw["launcher"] = {}
        for key, value in launcher_raw.items():
            section[key] = value
            sources[f"launcher.{key}"] = str(launcher_config)
    for flag in FLAGS:
        value = overrides.values.get(flag.dest)
        if value is None or flag.path is None:
            continue
        section_name, key = flag.path
        section = raw.setdefault(section_name, {})
        if isinstance(section, dict):
            section[key] = value
            sources[f"{section_name}.{key}"] = flag.option
    worker_urls = overrides.values.get("worker_urls")
    if worker_urls is not None:
        raw["workers"] = [{"url": url} for url in worker_urls]
        sources["workers"] = "--worker-urls"
    source = str(path) if path is not None else "(defaults)"
    config = structure_config(raw, source, sources)
    config = attrs.evolve(config, security=resolve_secrets(config.security, source))
    check_tenants(config, source)
    return LoadedConfig(config, source, _given_keys(raw))


def _given_keys(raw: Mapping[str, Any]) -> frozenset[str]:
    keys = set(raw)
    for name, value in raw.items():
        if isinstance(value, dict):
            keys.update(f"{name}.{key}" for key in value)
    return frozenset(keys)


def structure_config(
    raw: Mapping[str, Any], source: str, sources: Mapping[str, str] | None = None
) -> Config:
    """Turn plain data into a `Config` or raise `ConfigError` listing every problem.

    `sources` maps key paths to where their values came from (a flag, another file);
    anything not listed is attributed to `source`.
    """
    try:
        return converter.structure(dict(raw), Config)
    except _STRUCTURE_ERRORS as exc:
        raise ConfigError(_problems(exc, sources or {}, source)) from None


def _problems(exc: Exception, sources: Mapping[str, str], default_source: str) -> list[str]:
    problems = []
    for line in cattrs.transform_error(exc, format_exception=_format_exception):
        key, message = _describe(line)
        if message.startswith("unknown key(s): "):
            keys = [f"{key}.{n}" if key else n for n in message.split(": ", 1)[1].split(", ")]
            pairs = [(k, "unknown key") for k in keys]
        else:
            pairs = [(key or "(top level)", message)]
        for full_key, text in pairs:
            source = next(
                (
                    src
                    for prefix, src in sources.items()
                    if full_key == prefix or full_key.startswith((prefix + ".", prefix + "["))
                ),
                default_source,
            )
            if source.startswith("--"):
                problems.append(f"{source}: {text}")
            else:
                problems.append(f"{source}: {full_key}: {text}")
    return problems


_SECRET_NAME = re.compile(r"TOKEN|KEY|SECRET|PASSW|CREDENTIAL", re.IGNORECASE)
MASK = "***"


def dump_config(config: Config) -> dict[str, Any]:
    """The effective config as plain data (for `check-config` and `/admin/config`).

    Secrets (fields marked `SECRET`) are masked: this output lands in terminals, CI logs and
    HTTP answers. An unset secret stays `""`, so the output still tells whether one is set;
    the `*_env` / `*_file` names that say where a secret comes from stay visible.
    """
    return _mask_secrets(config, converter.unstructure(config))


def _mask_secrets(obj: Any, data: dict[str, Any]) -> dict[str, Any]:
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        if field.metadata.get("secret"):
            data[field.name] = _mask(value)
        elif field.metadata.get("secret_values"):
            data[field.name] = {name: MASK for name in value}
        elif field.metadata.get("argv"):
            data[field.name] = mask_argv(value)
        elif attrs.has(type(value)):
            _mask_secrets(value, data[field.name])
        elif isinstance(value, list):
            for item, item_data in zip(value, data[field.name], strict=True):
                if attrs.has(type(item)):
                    _mask_secrets(item, item_data)
    return data


def _mask(value: Any) -> Any:
    if isinstance(value, str):
        return MASK if value else ""
    if isinstance(value, list):
        return [_mask(item) for item in value]
    if isinstance(value, dict):
        return {
            name: _mask(item) if _SECRET_NAME.search(name) else item for name, item in value.items()
        }
    return value


_SECRET_WORDS = frozenset(
    {"token", "key", "apikey", "secret", "password", "passwd", "credential", "credentials"}
)
_WORD = re.compile(r"[a-z0-9]+")


def _names_a_secret(name: str) -> bool:
    """`--api-key`, `--hf-token`, `HF_TOKEN`: a word of the name is a credential word
    (whole words, so `--max-tokens` and `--tokenizer-path` stay readable)."""
    return not _SECRET_WORDS.isdisjoint(_WORD.findall(name.lower()))


def mask_argv(argv: Iterable[str]) -> list[str]:
    """A command line fit to print: the value of every secret-looking flag masked.

    `--api-key X` and `--api-key=X` become `--api-key ***` and `--api-key=***`; a
    `NAME=value` assignment (`env HF_TOKEN=x sglang serve`) whose name looks secret too.
    The argument after a secret flag is kept when it is another `--flag` (a switch).
    """
    masked: list[str] = []
    hide_next = False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if hide_next and not arg.startswith("--"):
            masked.append(MASK)
        elif eq and value and _names_a_secret(name):
            masked.append(f"{name}={MASK}")
        else:
            masked.append(arg)
        hide_next = arg.startswith("-") and not eq and _names_a_secret(arg)
    return masked


def resolve_secrets(security: SecurityConfig, source: str) -> SecurityConfig:
    """Read the configured secret sources; the effective secrets replace the literals.

    The admin token comes from, in order: `admin_token_file` (its first line),
    `admin_token_env`, `admin_token`. API keys are `api_keys` plus one per line of
    `api_keys_file` (blank lines and lines starting with `#`, indented or not, skipped).
    A source that is configured must deliver: an unset or empty variable, an unreadable
    file, an empty first line or a keys file without a key is a `ConfigError` naming the
    key and `source`. Quietly falling back to "no token" would open the control plane to
    anyone after one typo in a variable name.
    """
    problems: list[str] = []

    def problem(key: str, text: str) -> None:
        problems.append(f"{source}: security.{key}: {text}")

    token = security.admin_token
    if security.admin_token_env:
        name = security.admin_token_env
        value = os.environ.get(name)
        if value is None:
            problem("admin_token_env", f"environment variable {name!r} is not set")
        elif not value.strip():
            problem("admin_token_env", f"environment variable {name!r} is empty")
        else:
            token = value.strip()
    if security.admin_token_file:
        lines = _read_secret_file(security.admin_token_file, "admin_token_file", problem)
        if lines is not None:
            if lines and lines[0].strip():
                token = lines[0].strip()
            else:
                problem(
                    "admin_token_file",
                    f"the first line of {security.admin_token_file!r} is empty "
                    "(the token is the file's first line)",
                )
    keys = [key for key in security.api_keys if key]
    if security.api_keys_file:
        lines = _read_secret_file(security.api_keys_file, "api_keys_file", problem)
        if lines is not None:
            found = [
                line.strip() for line in lines if line.strip() and not line.strip().startswith("#")
            ]
            if not found:
                problem(
                    "api_keys_file",
                    f"{security.api_keys_file!r} holds no key (one key per line; blank "
                    "lines and # comments are skipped)",
                )
            keys += found
    tenant_keys = [_resolve_key(i, entry, problem) for i, entry in enumerate(security.keys)]
    if problems:
        raise ConfigError(problems)
    return attrs.evolve(security, admin_token=token, api_keys=keys, keys=tenant_keys)


def _resolve_key(index: int, entry: ApiKey, problem: Callable[[str, str], None]) -> ApiKey:
    """One `[[security.keys]]` entry with its key read: `key_file` (first line), else
    `key_env`, else `key`; the same rules as the admin token's sources."""
    where = f"keys[{index}]"
    key = entry.key
    if entry.key_env:
        value = os.environ.get(entry.key_env)
        if not value or not value.strip():
            state = "not set" if value is None else "empty"
            problem(f"{where}.key_env", f"environment variable {entry.key_env!r} is {state}")
        else:
            key = value.strip()
    if entry.key_file:
        lines = _read_secret_file(entry.key_file, f"{where}.key_file", problem)
        if lines is not None:
            if lines and lines[0].strip():
                key = lines[0].strip()
            else:
                problem(f"{where}.key_file", f"the first line of {entry.key_file!r} is empty")
    if not key and not entry.key_env and not entry.key_file:
        problem(where, "expected key, key_env or key_file")
    return attrs.evolve(entry, key=key)


def check_tenants(config: Config, source: str) -> None:
    """The checks that span keys: classes named exist, a tenant's keys agree on its limits
    (they share one state), and no key is given twice (it would name two tenants)."""
    tenants = config.tenants
    problems: list[str] = []
    if not tenants.classes or len(set(tenants.classes)) != len(tenants.classes):
        problems.append(f"{source}: tenants.classes: expected distinct class names, at least one")
    if tenants.default_class not in tenants.classes:
        problems.append(
            f"{source}: tenants.default_class: expected one of tenants.classes, "
            f"got {tenants.default_class!r}"
        )
    seen: dict[str, ApiKey] = {}
    keys: set[str] = set()
    for index, entry in enumerate(config.security.keys):
        where = f"{source}: security.keys[{index}]"
        if entry.priority_class and entry.priority_class not in tenants.classes:
            problems.append(
                f"{where}.priority_class: expected one of tenants.classes, "
                f"got {entry.priority_class!r}"
            )
        first = seen.setdefault(entry.tenant, entry)
        if first.limits() != entry.limits():
            problems.append(
                f"{where}: tenant {entry.tenant!r} has other limits or class in another key "
                "(a tenant's keys share them)"
            )
        if entry.key in keys:
            problems.append(f"{where}: this key is given twice")
        keys.add(entry.key)
    if problems:
        raise ConfigError(problems)


def _read_secret_file(name: str, key: str, problem: Callable[[str, str], None]) -> list[str] | None:
    try:
        return Path(name).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        problem(key, f"cannot read {name!r}: {exc.strerror or exc}")
    except UnicodeDecodeError:
        problem(key, f"{name!r} is not UTF-8 text")
    return None
