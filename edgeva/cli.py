"""Command line: edgeva run | check | stats | health (and the later tools as they land)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Callable

from edgeva import __version__
from edgeva.config import Config, ConfigError, StatsConfig, load_config
from edgeva.control import ControlError, request, resolve_endpoint

DEFAULT_CONFIG = "configs/demo.yaml"


def _default_config() -> str:
    return os.environ.get("EDGEVA_CONFIG", DEFAULT_CONFIG)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _load(path: str) -> Config:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"edgeva: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_run(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    cfg = _load(args.config)
    from edgeva.control import ControlError as BindError
    from edgeva.daemon import Daemon

    if args.endpoint:
        cfg.stats.endpoint = args.endpoint
    daemon = Daemon(cfg)
    daemon.install_signal_handlers()
    try:
        daemon.start()
    except (ConfigError, BindError) as exc:
        print(f"edgeva: {exc}", file=sys.stderr)
        daemon.shutdown()
        return 2
    return daemon.serve(max_runtime_s=args.duration, exit_when_sources_end=args.until_end)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    print(f"{args.config}: ok ({len(cfg.cameras)} cameras, {len(cfg.queries)} queries)")
    return 0


def _endpoint(args: argparse.Namespace) -> str:
    if args.endpoint:
        return args.endpoint
    if args.config:
        return resolve_endpoint(_load(args.config).stats.endpoint)
    return resolve_endpoint(StatsConfig().endpoint)


def cmd_stats(args: argparse.Namespace) -> int:
    from edgeva.stats import format_table

    endpoint = _endpoint(args)
    while True:
        try:
            snap = request(endpoint, {"cmd": "stats"}, timeout_s=args.timeout)
        except ControlError as exc:
            print(f"edgeva stats: {exc}", file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps(snap, indent=2, sort_keys=True))
        else:
            if args.watch:
                print("\x1b[2J\x1b[H", end="")
            print(format_table(snap))
        if not args.watch:
            return 0
        sys.stdout.flush()
        time.sleep(args.watch)


def cmd_health(args: argparse.Namespace) -> int:
    try:
        data = request(_endpoint(args), {"cmd": "health"}, timeout_s=args.timeout)
    except ControlError as exc:
        print(f"edgeva health: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(data, indent=2, sort_keys=True))
    return 0 if data.get("status") == "ok" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeva", description="Edge video-analytics pipeline daemon")
    parser.add_argument("--version", action="version", version=f"edgeva {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the daemon")
    run.add_argument("--config", "-c", default=_default_config(),
                     help=f"YAML config (default: $EDGEVA_CONFIG or {DEFAULT_CONFIG})")
    run.add_argument("--endpoint", help="override stats.endpoint (control socket)")
    run.add_argument("--duration", type=float, help="stop after this many seconds")
    run.add_argument("--until-end", action="store_true", help="stop when every (non-looping) source ended")
    run.add_argument("--log-level", default=os.environ.get("EDGEVA_LOG_LEVEL", "info"))
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config and exit")
    check.add_argument("--config", "-c", default=_default_config())
    check.set_defaults(func=cmd_check)

    for name, func, text in (("stats", cmd_stats, "print the running daemon's stats"),
                             ("health", cmd_health, "print the running daemon's health; exit 1 unless ok")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--endpoint", "-e", help="control endpoint (default: from --config, else the default ipc path)")
        p.add_argument("--config", "-c", help="read the endpoint from this config")
        p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for an answer")
        if name == "stats":
            p.add_argument("--json", action="store_true", help="raw JSON instead of the table")
            p.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                           help="refresh every SECONDS (default 2)")
        p.set_defaults(func=func)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Later capabilities (tune, merge, plan, worker, ...) add themselves here.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
