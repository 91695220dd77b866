"""`edgeva merge`: analyse a config's models for identical layers, or merge them incrementally.

    edgeva merge --analyze CONFIG [--json] [--limit N]
    edgeva merge CONFIG [--out DIR] [--time-budget S] [--resume] [--frames N] [--min-heldout N] ...

Every model runs at its query's configured input size (`input_size`, else the model's own), and
agreement is checked there on at least --min-heldout held-out frames per camera (the end of each
clip); the bundle records that size, and the daemon refuses it for a config that differs.
--time-budget covers the whole command: reading frames, the originals' outputs, the merge steps
and the final check through each model's own predict.

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
from .probe import CANDIDATES_PER_FRAME, PROBE
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
    p.add_argument("--frames", type=int, default=600,
                   help="frames sampled per camera, evenly over the clip (default 600)")
    p.add_argument("--min-heldout", type=int, default=200,
                   help="held out per camera: the clip's last 30%% of frames, and at least this many (default 200)")
    p.add_argument("--frame-size", type=int, help="shrink sampled frames to this long side (default: native size)")
    p.add_argument("--probe", type=int, default=0,
                   help="check every query also on this many probe frames made from the cameras' held-out frames "
                        "(blends, mosaics, zoomed crops, recoloured mirror images, grey pictures; a classifier on "
                        "those of five times as many where its original is least sure), and distil every model on "
                        "as many chosen alike from ones made of training frames: scenes the cameras do not show, "
                        "where a merged model may flip answers its own cameras never reveal (default 0: none)")
    p.add_argument("--init", choices=("mean", "anchor"), default="mean",
                   help="a shared tensor starts at the members' mean (default) or the first member's weights (Gemel)")
    p.add_argument("--distil-on", choices=("own", "all"), default="own",
                   help="distil each model on its own cameras' frames (default) or on every camera's")
    p.add_argument("--check-on", choices=("own", "all"), default="own",
                   help="check each query's agreement on its own camera's held-out frames (default) or on every camera's")
    p.add_argument("--accept-on", choices=("mean", "lower-bound"), default="mean",
                   help="a query's target holds when its mean agreement (default) or the Wilson 95%% lower bound "
                        "of it reaches the target")
    p.add_argument("--residuals", choices=("none", "int8"), default="none",
                   help="after full sharing, hold each layer still apart as the shared base plus an int8 residual per "
                        "model (weight = base + residual, a quarter of its float32 bytes), checked like any step and "
                        "never retrained; the dense weight is rebuilt each time the layer runs (default none)")
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
                                    min_heldout=args.min_heldout, device=args.device, probe=args.probe)
    settings = MergeSettings(train_steps=args.steps, eval_every=args.eval_every, batch_size=args.batch, lr=args.lr,
                             init=args.init, distil_on=args.distil_on, check_on=args.check_on, accept_on=args.accept_on,
                             max_trials=args.max_trials, seed=args.seed, residuals=args.residuals)
    merger = IncrementalMerger(workload, settings, out_dir=out, progress=lambda m: print(m, file=sys.stderr, flush=True))
    state = merger.resume() if args.resume else None
    setup_s = time.monotonic() - started
    if args.time_budget is not None:   # what is left after setup, less the final check (as long as the originals' run)
        merger.settings.time_budget_s = max(0.0, args.time_budget - setup_s - merger.check.reference_seconds)
    sizes = ", ".join(sorted({f"{m.input_size} px" for m in workload.models.values()}))
    heldout = ", ".join(f"{c} {len(f.heldout) // CANDIDATES_PER_FRAME} of {len(f.heldout)} candidates" if c == PROBE
                        else f"{c} {len(f.heldout)}" for c, f in workload.frames.items())
    print(f"{len(workload.models)} models at {sizes}, {len(workload.queries)} queries, held-out frames: {heldout}; "
          f"{len(merger.analysis.groups)} candidate groups ({merger.analysis.total_bytes_saved / 2**20:.1f} MiB at "
          f"most); setup {setup_s:.1f}s", file=sys.stderr)
    state = merger.run(state)
    report = build_report(merger, state, setup_s, config=str(args.config), total_budget_s=args.time_budget)
    report["time"]["total_s"] = round(time.monotonic() - started, 2)
    save_bundle(out / "bundle.pt", merger.modules, state.accepted, merger.meta(), report)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    text = format_report(report)
    (out / "report.txt").write_text(text + "\n")
    print(json.dumps(report, indent=1) if args.json else text)
    print(f"bundle: {out / 'bundle.pt'}", file=sys.stderr)
    return 0 if all(q["met"] for q in report["queries"].values()) else 1
