"""The `dsrouter` command line.

`run` takes the sglang-d-router flags as overrides of router.toml, so an existing start
command keeps working once `sglang-d-router` is replaced by `dsrouter run`. The operator
commands (`status`, `workers`, `refit`, `sleep`, `wake`, in `ctl.py`) talk to a running
router and read no config file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import attrs

from dsrouter import ctl
from dsrouter.config import ConfigError, LoadedConfig, Overrides, dump_config, load


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="router.toml (optional with flags only)")
    group = parser.add_argument_group("overrides (sglang-d-router flags)")
    group.add_argument("--host", help="bind address (server.host, default 0.0.0.0)")
    group.add_argument("--port", type=int, help="bind port (server.port, default 30080)")
    group.add_argument(
        "--worker-urls",
        nargs="*",
        metavar="URL",
        help="static workers; replaces [[workers]] of the file",
    )
    group.add_argument("--max-connections", type=int, help="server.max_connections")
    group.add_argument("--timeout", type=float, help="seconds a worker may take to answer")
    group.add_argument("--health-check-interval", type=float, help="health.interval_s")
    group.add_argument(
        "--health-check-failure-threshold", type=int, help="health.failure_threshold"
    )
    group.add_argument(
        "--routing-algorithm", help="least-request | round-robin | random (routing.algorithm)"
    )
    group.add_argument(
        "--launcher-config", type=Path, help="sglang-d-router launcher YAML (launcher: ...)"
    )
    group.add_argument("--log-level", help="debug | info | warning | error")
    group.add_argument("--verbose", action="store_true", help="same as --log-level debug")


def _load(args: argparse.Namespace) -> LoadedConfig:
    overrides = Overrides(
        host=args.host,
        port=args.port,
        worker_urls=args.worker_urls,
        max_connections=args.max_connections,
        timeout=args.timeout,
        health_check_interval=args.health_check_interval,
        health_check_failure_threshold=args.health_check_failure_threshold,
        routing_algorithm=args.routing_algorithm,
        log_level="debug" if args.verbose else args.log_level,
        launcher_config=args.launcher_config,
    )
    loaded = load(args.config, overrides)
    if getattr(args, "demo", False):
        from dsrouter.demo import demo_config

        loaded = attrs.evolve(loaded, config=demo_config(loaded.config, args.demo_workers))
    return loaded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsrouter", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the router")
    _add_overrides(run)
    run.add_argument(
        "--demo", action="store_true", help="also launch simulated CPU workers (no GPU needed)"
    )
    run.add_argument(
        "--demo-workers",
        type=int,
        default=2,
        metavar="N",
        help="number of simulated workers with --demo (default 2)",
    )
    check = commands.add_parser("check-config", help="validate and print the effective config")
    _add_overrides(check)
    ctl.add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ctl.COMMANDS:
        return ctl.main(args)
    try:
        config = _load(args).config
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    if args.command == "check-config":
        print(json.dumps(dump_config(config), indent=2))
        return 0
    from dsrouter.daemon import main_run
    from dsrouter.logs import setup_logging

    setup_logging(config.logging)
    return main_run(config, lambda: _load(args))
