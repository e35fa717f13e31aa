"""Command line of the simulated worker.

It accepts the flags the launcher passes to `sglang serve` (so `dsrouter run --demo` goes
through the same code path as a GPU pool) plus the knobs that make it useful for tests and
benchmarks: how long work takes, how fast this "GPU" is, and which faults to inject.
"""

from __future__ import annotations

import argparse

import attrs

TASK_OUTPUTS = {
    "T2I": "IMAGE",
    "I2I": "IMAGE",
    "TI2I": "IMAGE",
    "T2V": "VIDEO",
    "I2V": "VIDEO",
    "TI2V": "VIDEO",
    "V2V": "VIDEO",
    "F2V": "VIDEO",
    "I2M": "MESH",
}
IMAGE_INPUT_REQUIRED = {"I2I", "I2V", "I2M"}
IMAGE_INPUT_ACCEPTED = {"I2I", "TI2I", "I2V", "TI2V", "I2M"}


@attrs.frozen
class Faults:
    """Initial fault settings; `POST /_sim/faults` changes them at run time."""

    fail_rate: float = 0.0
    hang_rate: float = 0.0
    exit_after: int | None = None
    slow_body_bps: int = 0


@attrs.frozen
class SimOptions:
    host: str
    ports: list[int]
    model_path: str
    served_model_name: str
    num_gpus: int
    task_types: list[str]
    strict_ports: bool
    load_s: float
    warmup_s: float
    sec_per_mpx_step: float
    default_steps: int
    speed: float
    video_bytes: int | None
    seed: int
    faults: Faults
    require_api_key: str = ""

    @property
    def output_types(self) -> list[str]:
        return sorted({TASK_OUTPUTS[task] for task in self.task_types})


def _task_types(text: str) -> list[str]:
    tasks = [t.strip().upper() for t in text.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_OUTPUTS]
    if unknown or not tasks:
        raise argparse.ArgumentTypeError(
            f"unknown task type(s) {unknown}; known: {', '.join(TASK_OUTPUTS)}"
        )
    return tasks


def _port_range(text: str) -> list[int]:
    start, _, count = text.partition(":")
    try:
        first, number = int(start), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError("expected START:COUNT, e.g. 21000:1000") from None
    if first <= 0 or number <= 0 or first + number > 65536:
        raise argparse.ArgumentTypeError("ports must lie in 1..65535")
    return list(range(first, first + number))


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError("expected true or false")


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("expected a fraction between 0 and 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dsrouter.simworker",
        description="A CPU stand-in for `sglang serve` (diffusion) speaking the same HTTP API.",
    )
    serve = parser.add_argument_group("sglang serve flags")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument(
        "--port",
        type=int,
        action="append",
        default=[],
        help="HTTP port (repeatable: one simulated worker per port)",
    )
    serve.add_argument("--model-path", default="sim/Wan-Sim")
    serve.add_argument("--served-model-name", default=None)
    serve.add_argument("--num-gpus", type=int, default=1)
    serve.add_argument("--master-port", type=int, default=30005, help="accepted, unused")
    serve.add_argument("--scheduler-port", type=int, default=5555, help="accepted, unused")
    serve.add_argument(
        "--strict-ports",
        type=_boolean,
        default=False,
        help="fail when the port is busy instead of moving to port+42",
    )
    sim = parser.add_argument_group("simulation")
    sim.add_argument(
        "--port-range",
        type=_port_range,
        metavar="START:COUNT",
        help="serve COUNT workers on consecutive ports from START",
    )
    sim.add_argument(
        "--task-type",
        type=_task_types,
        default=["T2I"],
        help="comma-separated supported task types (default T2I)",
    )
    sim.add_argument(
        "--load-s",
        type=float,
        default=0.0,
        help="seconds with the port closed, as while weights load",
    )
    sim.add_argument(
        "--warmup-s",
        type=float,
        default=0.0,
        help="seconds of warmup: /health 503 with an empty body, other requests held",
    )
    sim.add_argument(
        "--sec-per-mpx-step",
        type=float,
        default=0.002,
        help="service time per megapixel x step x frame x output (0 = instant)",
    )
    sim.add_argument("--default-steps", type=int, default=30)
    sim.add_argument(
        "--speed", type=float, default=1.0, help="relative GPU speed; service time is divided by it"
    )
    sim.add_argument(
        "--video-bytes", type=int, default=None, help="size of every video file (default: 1 MiB)"
    )
    sim.add_argument("--seed", type=int, default=0, help="seed of the fault dice")
    sim.add_argument(
        "--require-api-key",
        default="",
        metavar="KEY",
        help="answer 401 to every request without 'Authorization: Bearer KEY' (but /_sim/*), "
        "as an authenticating proxy in front of a worker does (the worker itself has no auth)",
    )
    faults = parser.add_argument_group("faults (also settable via POST /_sim/faults)")
    faults.add_argument(
        "--fail-rate",
        type=_rate,
        default=0.0,
        help="fraction of generations answered with a plain-text 500",
    )
    faults.add_argument(
        "--hang-rate", type=_rate, default=0.0, help="fraction of POSTs that never answer"
    )
    faults.add_argument(
        "--exit-after",
        type=int,
        default=None,
        help="exit abruptly halfway through the answer of the Nth next request",
    )
    faults.add_argument(
        "--slow-body-bps",
        type=int,
        default=0,
        help="send response bodies at this many bytes per second",
    )
    return parser


def parse_options(argv: list[str] | None = None) -> SimOptions:
    parser = build_parser()
    args = parser.parse_args(argv)
    ports = [*args.port, *(args.port_range or [])]
    if not ports:
        ports = [30000]
    if min(args.sec_per_mpx_step, args.load_s, args.warmup_s) < 0 or args.speed <= 0:
        parser.error("times must be >= 0 and --speed > 0")
    return SimOptions(
        host=args.host,
        ports=ports,
        model_path=args.model_path,
        served_model_name=args.served_model_name or args.model_path,
        num_gpus=args.num_gpus,
        task_types=args.task_type,
        strict_ports=args.strict_ports,
        load_s=args.load_s,
        warmup_s=args.warmup_s,
        sec_per_mpx_step=args.sec_per_mpx_step,
        default_steps=args.default_steps,
        speed=args.speed,
        video_bytes=args.video_bytes,
        seed=args.seed,
        faults=Faults(
            fail_rate=args.fail_rate,
            hang_rate=args.hang_rate,
            exit_after=args.exit_after,
            slow_body_bps=args.slow_body_bps,
        ),
        require_api_key=args.require_api_key,
    )
