"""Command line: edgeva run | check | stats | health (and the later tools as they land)."""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time

from edgeva import __version__
from edgeva.config import Config, ConfigError, StatsConfig, load_config
from edgeva.control import ControlError, request, resolve_endpoint

DEFAULT_CONFIG = "configs/demo.yaml"


def _default_config() -> str:
    return os.environ.get("EDGEVA_CONFIG", DEFAULT_CONFIG)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # FFmpeg/OpenCV print a warning on every failed reconnect attempt; edgeva logs those itself.
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    import cv2

    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    except AttributeError:  # builds without the logging utilities
        pass


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
    except Exception as exc:   # a bug or the machine: still a message and 2 (systemd must not loop)
        logging.getLogger("edgeva").debug("start-up failed", exc_info=True)
        print(f"edgeva: start-up failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        daemon.shutdown()
        return 2
    rc = daemon.serve(max_runtime_s=args.duration, exit_when_sources_end=args.until_end)
    if args.until_end:
        print(daemon.summary(), flush=True)
    return rc


def cmd_check(args: argparse.Namespace) -> int:
    """The checks start-up and reload make (edgeva.deployment.prepare), without starting anything."""
    _setup_logging(args.log_level)
    cfg = _load(args.config)
    from edgeva.deployment import prepare
    from edgeva.pool import ModelPool

    try:
        deployment = prepare(cfg, ModelPool())
    except ConfigError as exc:
        print(f"edgeva: {exc}", file=sys.stderr)
        return 2
    splits = f", {len(deployment.splits)} split" if deployment.splits else ""
    offloaded = sum(1 for r in deployment.routes.values() if not r.local)
    print(f"{args.config}: ok ({len(cfg.cameras)} cameras, {len(cfg.queries)} queries, "
          f"{len(deployment.pool.models)} models loaded and run, {offloaded} offloaded{splits})")
    random_init = sorted(key for key, model in deployment.pool.models.items() if getattr(model, "weights", "") is None)
    if random_init:
        print(f"edgeva: WARNING: random weights (no weights file; results would be noise): {', '.join(random_init)}",
              file=sys.stderr)
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

    check = sub.add_parser("check", help="run start-up's checks (models loaded and run, routes, splits, "
                                          "bundle, sinks) and exit; 2 on a config error")
    check.add_argument("--config", "-c", default=_default_config())
    check.add_argument("--log-level", default="warning")
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

    tune = sub.add_parser("tune", help="profile a segment of each camera: where each query's filter starts")
    tune.add_argument("--config", "-c", default=_default_config())
    tune.add_argument("--seconds", type=float, default=60.0, help="length of the profiling segment")
    tune.add_argument("--start", type=float, default=0.0, help="where the segment starts in a file (s)")
    tune.add_argument("--query", action="append", help="tune only these queries (repeatable)")
    tune.add_argument("--write", action="store_true", help="write each query's starting setting (filter.tuned) into the config file")
    tune.add_argument("--plot", help="save the skip%%-vs-agreement curves to this PNG")
    tune.add_argument("--json", action="store_true")
    tune.add_argument("--log-level", default="warning")
    tune.set_defaults(func=cmd_tune)

    results = sub.add_parser("results", help="show recent results from the SQLite sink")
    results.add_argument("--config", "-c", default=_default_config(), help="read sinks.sqlite from this config")
    results.add_argument("--db", help="the SQLite file (overrides --config)")
    results.add_argument("--query", help="only this query")
    results.add_argument("--limit", type=int, default=20)
    results.add_argument("--json", action="store_true")
    results.set_defaults(func=cmd_results)

    models = sub.add_parser("models", help="list the model zoo")
    models.set_defaults(func=cmd_models)

    profile = sub.add_parser("profile", help="measure per-split-point latency and output size of zoo models")
    profile.add_argument("models", nargs="+", help="zoo names (torchvision classifiers)")
    profile.add_argument("--input", type=int, default=224, help="square input side")
    profile.add_argument("--repeats", type=int, default=5)
    profile.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    profile.add_argument("-o", "--output", help="append the profiles to this YAML file (hierarchy 'models:' format)")
    profile.set_defaults(func=cmd_profile)

    for name, (_, _, text) in DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def _profile_yaml(name: str, prof, side: int) -> dict:
    """A measured profile in the hierarchy file's `models:` format (MB = 1e6 bytes, as the loader reads it)."""
    from edgeva.placement.model import MB as mb
    return {"name": name, "source": f"edgeva profile: {prof.source}",
            "split_points": [{"name": sp.name, "head_ms": round(sp.head_ms, 3), "tail_ms": round(sp.tail_ms, 3),
                              "activation_bytes": int(sp.activation_bytes),
                              "head_weight_mb": round(sp.head_weight_bytes / mb, 4),
                              "tail_weight_mb": round(sp.tail_weight_bytes / mb, 4)} for sp in prof.split_points]}


def cmd_profile(args: argparse.Namespace) -> int:
    import yaml

    from edgeva.models import build_model, resolve_device
    from edgeva.placement import profile_model

    device = resolve_device(args.device)
    profiles = []
    for name in args.models:
        module = build_model(name, place=False).module
        if module is None:
            print(f"edgeva profile: {name} has no torch module to split", file=sys.stderr)
            return 1
        try:
            prof = profile_model(module.eval(), (1, 3, args.input, args.input), repeats=args.repeats,
                                 device=device)
        except ValueError as exc:
            print(f"edgeva profile: {name}: {exc}", file=sys.stderr)
            return 1
        profiles.append(_profile_yaml(name, prof, args.input))
        print(yaml.safe_dump([profiles[-1]], sort_keys=False))
    if args.output:
        with open(args.output, "a") as f:
            yaml.safe_dump(profiles, f, sort_keys=False)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from edgeva.tuning import format_tunings, plot_curves, tune_config, write_tunings

    _setup_logging(args.log_level)
    cfg = _load(args.config)
    tunings = list(tune_config(cfg, args.seconds, args.start, set(args.query) if args.query else None))
    if not tunings:
        print("edgeva tune: no query with a model to tune", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([{"query": t.query, "frames": t.frames, "feature": t.best.feature,
                           "threshold": t.best.threshold if t.best.threshold is None or
                           math.isfinite(t.best.threshold) else "none",
                           "max_age_s": round(t.best.max_age / t.fps, 3), "margin": t.best.margin,
                           "skip_fraction": t.best.skip_fraction,
                           "agreement": t.best.agreement, "met_target": t.best.met_target,
                           "informed": t.informed} for t in tunings], indent=2))
    else:
        print(format_tunings(tunings))
    if args.plot:
        plot_curves(tunings, args.plot)
        print(f"curves: {args.plot}")
    if args.write:
        print(f"each query's starting setting (filter.tuned; it learns on from there) written to "
              f"{write_tunings(args.config, tunings)} (previous file kept as .bak)")
    return 0 if all(t.best.met_target for t in tunings) else 3


def cmd_results(args: argparse.Namespace) -> int:
    from edgeva.sinks import read_results

    db = args.db or _load(args.config).sinks.sqlite
    if not db or not os.path.exists(db):
        print(f"edgeva results: no results database ({db or 'sinks.sqlite is not set'})", file=sys.stderr)
        return 1
    rows = list(read_results(db, args.query, args.limit))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'query':<18} {'camera':<10} {'seq':>7} {'outcome':<9} {'age':>4} {'ms':>8}  value")
    for r in rows:
        print(f"{r['query']:<18} {r['camera']:<10} {r['seq']:>7} {r['outcome']:<9} {r['age_frames']:>4} "
              f"{r['latency_ms']:>8.1f}  {r['reason'] if r['outcome'] == 'dropped' else json.dumps(r['value'])[:60]}")
    return 0


def cmd_models(_args: argparse.Namespace) -> int:
    from edgeva.models.zoo import ZOO_KINDS

    for name, kind in ZOO_KINDS.items():
        print(f"{name:<28} {kind}")
    return 0


# Commands with their own argument parsers, run with the rest of the command line.
DELEGATED = {
    "plan": ("edgeva.placement", "plan_command", "place queries on the edge hierarchy (see edgeva plan -h)"),
    "merge": ("edgeva.merging", "merge_main", "analyse or merge identical layers across models (edgeva merge -h)"),
    "worker": ("edgeva.offload", "worker_main", "serve offloaded inference to other tiers (edgeva worker -h)"),
    "keys": ("edgeva.offload", "keys_main", "make a CurveZMQ key pair (edgeva keys -h)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in DELEGATED:
        import importlib

        module, func, _ = DELEGATED[argv[0]]
        _setup_logging(os.environ.get("EDGEVA_LOG_LEVEL", "info"))
        try:
            return int(getattr(importlib.import_module(module), func)(argv[1:]) or 0)
        except KeyboardInterrupt:
            return 130
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `edgeva models | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
