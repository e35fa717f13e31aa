"""Operator commands that talk to a running router: status, workers, refit, sleep, wake.

They need no router.toml, only where the router listens (`--url`, else `$DSROUTER_URL`) and
its admin token (`$DSROUTER_ADMIN_TOKEN`, or the variable named by `--token-env`), and go
through `dsrouter.client` like any trainer would.

Exit status: 0 done; 1 the router answered but the operation did not fully succeed (a refit
left workers behind, a worker refused to sleep, an unknown worker); 2 usage or connection
problem (router unreachable, bad token, bad worker URL), reported in one line on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from dsrouter.client import (
    ADMIN_TOKEN_ENV,
    DEFAULT_TIMEOUT_S,
    DEFAULT_URL,
    BroadcastResult,
    Client,
    HTTPStatusError,
    PoolHealth,
    RefitError,
    RouterUnreachableError,
    WorkerInfo,
)
from dsrouter.urls import InvalidWorkerURL

URL_ENV = "DSROUTER_URL"
COMMANDS = frozenset({"status", "workers", "refit", "sleep", "wake"})
QUICK_TIMEOUT_S = 30.0
"""For reads and worker management; refits and sleep/wake get the client's long default."""

OK, FAILED, USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad input found before talking to the router; exit 2."""


Command = Callable[[Client, argparse.Namespace], int]


# ---- status formatting (pure, unit-tested) -----------------------------------------------


LAUNCH_WEIGHTS = "as-launched"
"""A worker's weights before any refit: what its `--model-path` loaded."""
SLOT_STATES = (("starting", "starting"), ("backoff", "restarting"), ("failed", "failed"))
"""Launcher slot states counted in the header, and the word shown for each."""


def pool_version(workers: list[WorkerInfo]) -> str:
    """The weights the routable pool serves, read from the workers that are not stale."""
    versions = sorted({w.weight_version or LAUNCH_WEIGHTS for w in workers if not w.is_stale})
    if not versions:
        return "unknown"
    return versions[0] if len(versions) == 1 else "mixed (" + ", ".join(versions) + ")"


def _sleep_state(health: PoolHealth) -> str:
    if health.pool_sleeping:
        return "asleep"
    if health.total_workers and health.sleeping_workers == health.total_workers:
        return "asleep"
    if health.sleeping_workers:
        return f"partly asleep ({health.sleeping_workers}/{health.total_workers})"
    return "awake"


def format_header(
    url: str, health: PoolHealth, workers: list[WorkerInfo], slots: Sequence[Mapping[str, Any]] = ()
) -> str:
    """One line. Launched workers that are not registered (starting, restarting, failed,
    stopped: the registry holds one only while it is ready) count in the pool's total."""
    unregistered = [slot for slot in slots if not slot.get("registered")]
    total = health.total_workers + len(unregistered)
    parts = [f"{health.healthy_workers}/{total} workers routable"]
    slot_counts = [
        (sum(slot.get("state") == state for slot in unregistered), word)
        for state, word in SLOT_STATES
    ]
    for count, word in (
        *slot_counts,
        (health.dead_workers, "dead"),
        (health.draining_workers, "draining"),
        (health.stale_workers, "stale"),
    ):
        if count:
            parts.append(f"{count} {word}")
    parts += [
        f"{health.queued} queued",
        f"{health.in_flight} in flight",
        f"weights {health.target_version or pool_version(workers)}",
        _sleep_state(health),
    ]
    return f"router {url}: {health.status}, " + ", ".join(parts)


def _speed(seconds_per_unit: float | None) -> str:
    return "-" if seconds_per_unit is None else f"{seconds_per_unit:.3g}"


def _video(support: bool | None) -> str:
    return "?" if support is None else "yes" if support else "no"


SPEED_NOTE = (
    "S/MPX-STEP: seconds the worker takes per megapixel per denoising step, learned from "
    "its answers (- until measured); WEIGHTS: the version of its last refit, "
    f"'{LAUNCH_WEIGHTS}' before any"
)


def format_table(workers: list[WorkerInfo]) -> str:
    """One row per worker, columns padded to the widest cell; numbers right-aligned."""
    header = ("WORKER", "STATE", "IN-FLIGHT", "FAILURES", "S/MPX-STEP", "WEIGHTS", "VIDEO")
    rows = [
        (
            w.url,
            w.state,
            str(w.active_requests),
            str(w.consecutive_failures),
            _speed(w.seconds_per_unit),
            w.weight_version or LAUNCH_WEIGHTS,
            _video(w.video_support),
        )
        for w in workers
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {2, 3, 4}

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join(line(cells).rstrip() for cells in [header, *rows])


def format_queued(by_tenant: dict[str, int]) -> str:
    """The router queue per tenant, longest first ("" when nobody waits)."""
    if not by_tenant:
        return ""
    ranked = sorted(by_tenant.items(), key=lambda item: (-item[1], item[0]))
    return "queued by tenant: " + ", ".join(f"{name} {count}" for name, count in ranked)


def format_status(
    url: str, health: PoolHealth, workers: list[WorkerInfo], slots: Sequence[Mapping[str, Any]] = ()
) -> str:
    lines = [format_header(url, health, workers, slots)]
    lines += [format_table(workers), SPEED_NOTE] if workers else ["no workers registered"]
    problems = [
        f"  {w.url}: {w.last_error}" for w in workers if w.last_error and w.state != "healthy"
    ]
    if problems:
        lines += ["", "last errors:", *problems]
    return "\n".join(lines)


def format_slots(slots: list[dict[str, Any]]) -> str:
    """Launcher slots that are not serving (starting, backoff, failed, stopped), one line
    each plus why; "" when every slot is ready. Ready ones are rows of the table already;
    the others are in no table, since the registry holds a worker only while it is ready."""
    lines = []
    for slot in slots:
        if slot.get("state") == "ready":
            continue
        parts = [f"{slot.get('restarts', 0)} restart(s)"]
        if slot.get("node"):
            parts.append(f"node {slot['node']}")  # the Ray backend's slots
        if slot.get("last_exit"):
            parts.append(f"last exit: {slot['last_exit']}")
        if slot.get("log_file"):
            parts.append(f"log {slot['log_file']}")
        lines.append(
            f"  worker {slot.get('index')} ({slot.get('url')}): {slot.get('state')}, "
            + ", ".join(parts)
        )
        if slot.get("detail"):
            lines.append(f"    {slot['detail']}")
    return "\n".join(["launched workers not serving:", *lines]) if lines else ""


def format_broadcast(result: BroadcastResult, done: str) -> str:
    if not result.results:
        return result.message or "no worker targeted"
    return "\n".join(
        f"{r.worker_url}: {done if r.ok else 'failed: ' + r.reason}" for r in result.results
    )


# ---- commands ----------------------------------------------------------------------------


def _status(client: Client, args: argparse.Namespace) -> int:
    health, workers, slots = client.health(), client.workers(), client.managed_workers()
    print(format_status(client.base_url, health, workers, slots))
    queued = format_queued(client.queued_by_tenant())
    if queued:
        print(f"\n{queued}")
    not_serving = format_slots(slots)
    if not_serving:
        print(f"\n{not_serving}")
    return OK


def _workers(client: Client, args: argparse.Namespace) -> int:
    url = args.worker_url
    if args.action == "add":
        worker = client.add_worker(url)
        print(f"added {worker.url} ({worker.state})")
    elif args.action == "remove":
        client.remove_worker(url)
        print(f"removed {url}")
    elif args.action == "drain":
        worker = client.set_draining(url, True, remove_when_drained=args.remove_when_drained)
        then = "; removed once idle" if args.remove_when_drained else ""
        print(f"{worker.url}: draining, {worker.active_requests} in flight{then}")
    else:
        worker = client.set_draining(url, False)
        print(f"{worker.url}: back in rotation ({worker.state})")
    return OK


def _refit(client: Client, args: argparse.Namespace) -> int:
    try:
        result = client.refit(
            args.path, version=args.version, mode=args.mode, verify_checksum=args.verify_checksum
        )
    except RefitError as exc:
        failed = exc.result
        print(
            f"refit failed on {len(exc.failed)} of {len(failed.results)} worker(s); "
            f"pool version {failed.version}",
            file=sys.stderr,
        )
        for url, reason in exc.failed.items():
            print(f"  {url}: {reason}", file=sys.stderr)
        if failed.message:
            print(failed.message, file=sys.stderr)
        return FAILED
    print(
        f"refit: pool on version {result.version} "
        f"({len(result.results)}/{len(result.results)} workers confirmed)"
    )
    return OK


def _memory(sleep: bool) -> Command:
    def run(client: Client, args: argparse.Namespace) -> int:
        result = client.sleep() if sleep else client.wake()
        print(format_broadcast(result, "asleep" if sleep else "awake"))
        return OK if result.ok else FAILED

    return run


# ---- wiring ------------------------------------------------------------------------------


def add_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the operator subcommands on the `dsrouter` parser."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_argument_group("router connection")
    group.add_argument(
        "--url", default=None, help=f"router base URL (default ${URL_ENV}, else {DEFAULT_URL})"
    )
    group.add_argument(
        "--token-env",
        metavar="NAME",
        default=None,
        help=f"environment variable holding the admin token (default {ADMIN_TOKEN_ENV})",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="give up on the router after this long",
    )

    status = commands.add_parser("status", parents=[common], help="pool and worker overview")
    status.set_defaults(ctl=_status, quick=True)

    # The connection flags sit on the leaves only: argparse lets a subparser's defaults
    # overwrite what its parent parsed, so `workers --url X drain` would lose X.
    workers = commands.add_parser("workers", help="add, remove, drain or undrain a worker")
    actions = workers.add_subparsers(dest="action", required=True)
    for action, text in (
        ("add", "register a worker"),
        ("remove", "forget a worker"),
        ("drain", "stop routing new requests to a worker"),
        ("undrain", "put a drained worker back in rotation"),
    ):
        sub = actions.add_parser(action, parents=[common], help=text)
        sub.add_argument("worker_url", metavar="URL")
        if action == "drain":
            sub.add_argument(
                "--remove-when-drained",
                action="store_true",
                help="forget the worker once its requests finish",
            )
    workers.set_defaults(ctl=_workers, quick=True)

    refit = commands.add_parser(
        "refit", parents=[common], help="load new weights from disk on every active worker"
    )
    refit.add_argument("path", help="checkpoint path, as the workers see it")
    refit.add_argument("--version", help="name of the new weights (default: the path)")
    refit.add_argument(
        "--mode",
        choices=("drain", "immediate"),
        default="drain",
        help="drain: finish in-flight requests first (default)",
    )
    refit.add_argument(
        "--verify-checksum",
        action="store_true",
        help="compare weight checksums afterwards; outliers become stale",
    )
    refit.set_defaults(ctl=_refit, quick=False)

    commands.add_parser(
        "sleep", parents=[common], help="release the pool's GPU memory"
    ).set_defaults(ctl=_memory(True), quick=False)
    commands.add_parser("wake", parents=[common], help="take the GPU memory back").set_defaults(
        ctl=_memory(False), quick=False
    )


def _admin_token(args: argparse.Namespace) -> str:
    if args.token_env is None:
        return os.environ.get(ADMIN_TOKEN_ENV, "")
    if args.token_env not in os.environ:
        raise UsageError(f"environment variable {args.token_env} (--token-env) is not set")
    return os.environ[args.token_env]


def main(args: argparse.Namespace) -> int:
    """Run one operator command; errors become one line on stderr and an exit status."""
    prefix = f"dsrouter {args.command}"
    url = args.url or os.environ.get(URL_ENV) or DEFAULT_URL
    timeout = args.timeout or (QUICK_TIMEOUT_S if args.quick else DEFAULT_TIMEOUT_S)
    try:
        with Client(url, admin_token=_admin_token(args), api_key="", timeout=timeout) as client:
            return args.ctl(client, args)
    except (UsageError, RouterUnreachableError, InvalidWorkerURL) as exc:
        print(f"{prefix}: {exc}", file=sys.stderr)
        return USAGE
    except HTTPStatusError as exc:
        hint = "; check the admin token" if exc.status in (401, 403) else ""
        print(f"{prefix}: router answered {exc.status}: {exc.message}{hint}", file=sys.stderr)
        return USAGE if exc.status in (401, 403) else FAILED
