"""`edgeva merge`: analyse a config's models for identical layers, or merge them incrementally.

    edgeva merge --analyze CONFIG [--json] [--limit N]
    edgeva merge CONFIG [--out DIR] [--time-budget S] [--resume] [--frames N] [--input-size PX] ...

The merge writes DIR/bundle.pt (load with `edgeva.merging.load_bundle`), DIR/report.json,
DIR/report.txt, and after every trial DIR/progress.json (+ DIR/checkpoint.pt after every
accepted step) so `--resume` continues where a run stopped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import ConfigError, load_config
from .analysis import analyse_modules, format_analysis
from .bundle import save_bundle
from .merger import IncrementalMerger, MergeSettings
from .report import build_report, format_report
from .workload import workload_from_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeva merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--analyze", "--analyse", action="store_true", help="list groups of identical layers and exit")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--limit", type=int, default=40, help="groups shown in the table (default 40)")
    p.add_argument("--out", type=Path, help="output folder (default var/merge/<config name>)")
    p.add_argument("--time-budget", type=float, help="seconds for the merge loop; stops between steps")
    p.add_argument("--resume", action="store_true", help="continue from the progress saved in --out")
    p.add_argument("--frames", type=int, default=48, help="frames sampled per camera (70%% train, 30%% held out)")
    p.add_argument("--frame-size", type=int, default=160, help="long side the sampled frames are shrunk to")
    p.add_argument("--input-size", type=int, help="network input size for merging (originals and merged alike)")
    p.add_argument("--steps", type=int, default=60, help="most retraining steps per trial")
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--max-trials", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto: CUDA when present)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (1 is fastest on busy shared cores)")
    return p


def merge_main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.analyze:
        workload = workload_from_config(cfg, device=args.device, read_frames=False)
        analysis = analyse_modules(workload.modules, workload.architectures)
        print(json.dumps(analysis.to_json(), indent=1) if args.json else format_analysis(analysis, args.limit))
        return 0

    out = args.out or Path("var/merge") / Path(args.config).stem
    started = time.monotonic()
    workload = workload_from_config(cfg, frames_per_camera=args.frames, frame_long_side=args.frame_size,
                                    input_size=args.input_size, device=args.device)
    settings = MergeSettings(train_steps=args.steps, eval_every=args.eval_every, batch_size=args.batch, lr=args.lr,
                             time_budget_s=args.time_budget, max_trials=args.max_trials, seed=args.seed)
    merger = IncrementalMerger(workload, settings, out_dir=out, progress=lambda m: print(m, file=sys.stderr, flush=True))
    state = merger.resume() if args.resume else None
    setup_s = time.monotonic() - started
    print(f"{len(workload.models)} models, {len(workload.queries)} queries, {len(merger.analysis.groups)} candidate "
          f"groups ({merger.analysis.total_bytes_saved / 2**20:.1f} MiB at most); setup {setup_s:.1f}s",
          file=sys.stderr)
    state = merger.run(state)
    report = build_report(merger, state, setup_s, config=str(args.config))
    save_bundle(out / "bundle.pt", merger.modules, state.accepted, merger.meta(), report)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    text = format_report(report)
    (out / "report.txt").write_text(text + "\n")
    print(json.dumps(report, indent=1) if args.json else text)
    print(f"bundle: {out / 'bundle.pt'}", file=sys.stderr)
    return 0 if all(q["met"] for q in report["queries"].values()) else 1
