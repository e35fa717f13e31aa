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
import trio

from dsrouter import __version__, ctl, preflight
from dsrouter.config import FLAGS, ConfigError, LoadedConfig, Overrides, dump_config, load


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="router.toml (optional with flags only)")
    group = parser.add_argument_group("overrides (sglang-d-router flags)")
    for flag in FLAGS:
        where = f" ({'.'.join(flag.path)})" if flag.path else ""
        if flag.dest == "worker_urls":
            group.add_argument(flag.option, nargs="*", metavar="URL", help=flag.help)
        else:
            group.add_argument(flag.option, type=flag.type, help=flag.help + where)
    group.add_argument("--verbose", action="store_true", help="same as --log-level debug")


def _load(args: argparse.Namespace) -> LoadedConfig:
    given = {flag.dest: getattr(args, flag.dest) for flag in FLAGS}
    if args.verbose:
        given["log_level"] = "debug"
    loaded = load(args.config, Overrides(**given))
    if getattr(args, "demo", False):
        from dsrouter.demo import demo_config

        loaded = attrs.evolve(loaded, config=demo_config(loaded.config, args.demo_workers))
    return loaded


def _worker_count(text: str) -> int:
    """`--demo-workers`: a demo of no workers (or fewer) serves nothing; say so up front."""
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"the demo needs at least 1 worker, got {count}")
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsrouter", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dsrouter {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the router")
    _add_overrides(run)
    run.add_argument(
        "--demo", action="store_true", help="also launch simulated CPU workers (no GPU needed)"
    )
    run.add_argument(
        "--demo-workers",
        type=_worker_count,
        default=2,
        metavar="N",
        help="number of simulated workers with --demo (default 2)",
    )
    check = commands.add_parser(
        "check-config",
        help="validate (as `run` does, without binding or launching) and print the config",
    )
    _add_overrides(check)
    ctl.add_parsers(commands)
    return parser


def sglang_d_router(argv: list[str] | None = None) -> int:
    """The `sglang-d-router` command: `dsrouter run` under the predecessor's name, so its
    start commands (same flags, same defaults where MIGRATING.md says so) keep working."""
    return main(["run", *(sys.argv[1:] if argv is None else argv)])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ctl.COMMANDS:
        return ctl.main(args)
    try:
        loaded = _load(args)
        problems = trio.run(preflight.check, loaded.config, loaded.source)
    except ConfigError as exc:
        problems = exc.problems
    if problems:
        for problem in problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    config = loaded.config
    if args.command == "check-config":
        print(json.dumps(dump_config(config), indent=2))
        return 0
    from dsrouter.daemon import main_run
    from dsrouter.logs import setup_logging

    setup_logging(config.logging)
    return main_run(config, lambda: _load(args))
