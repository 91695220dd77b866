#!/usr/bin/env python3
"""The filter as a user runs it: `edgeva run --until-end` on each clip with the real detector and
three queries (vehicle count, person count, person presence; confidence 0.3; target 0.9), no
threshold configured (each query calibrates on the camera) or, with --tune, after
`edgeva tune --seconds <a third of the clip> --write`. Every SQLite result is then compared
with the detector's own output on that frame (tools/reference_cache.py) with the task's strict
agreement. Per camera: the frames any of its queries inferred, and the images the model really ran
(from the run's summary; audits included). A recording replayed fast looks ahead by default
(skipped frames answered once the next kept frame's result is in, gaps whose ends disagree
bisected); `--no-look-ahead` configures `filter.look_ahead: false`, the filter as a live camera
runs it.

    .venv/bin/python tools/check_filter_daemon.py [--clips eval] [--tune] [--no-look-ahead]
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from bench_filtering import DAEMON_CAMERA, QUERIES, TARGET, clips_folder, clips_in, query_values  # noqa: E402
from edgeva.sinks import read_results  # noqa: E402
from reference_cache import DEFAULT_WEIGHTS, load_or_compute  # noqa: E402

EDGEVA = [sys.executable, "-m", "edgeva.cli"] if not (REPO / ".venv/bin/edgeva").exists() else [str(REPO / ".venv/bin/edgeva")]
TASKS = {"vehicles": ("count", ["car", "bus", "truck"]), "persons": ("count", ["person"]),
         "person-present": ("presence", ["person"])}


def config_for(clip: Path, db: Path, workdir: Path, look_ahead: bool = True) -> Path:
    cfg = {
        "cameras": [{"id": DAEMON_CAMERA, "source": str(clip), "replay": "fast"}],
        "queries": [{"id": q, "camera": DAEMON_CAMERA, "model": "yolov8n", "weights": str(DEFAULT_WEIGHTS),
                     "task": {"type": t, "classes": c, "confidence": 0.3}, "accuracy_target": TARGET,
                     "sla": {"latency_ms": 600000}, **({} if look_ahead else {"filter": {"look_ahead": False}})}
                    for q, (t, c) in TASKS.items()],
        "stats": {"endpoint": f"ipc://{workdir}/ctl.sock"},
        "sinks": {"sqlite": str(db), "batch": 64, "flush_s": 0.2},
    }
    path = workdir / "edgeva.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", default="eval")
    ap.add_argument("--tune", action="store_true", help="edgeva tune on the first third, then run")
    ap.add_argument("--no-look-ahead", action="store_true",
                    help="every query with `filter.look_ahead: false` (as a live camera filters)")
    args = ap.parse_args()
    folder = clips_folder(args.clips)
    print("| clip | query | frames | inferred | reused | dropped | agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    cameras: list[tuple[str, int, int | None]] = []
    for clip in clips_in(folder):
        ref = load_or_compute(clip)
        with tempfile.TemporaryDirectory(prefix="edgeva-check-") as tmp:
            workdir = Path(tmp)
            db = workdir / "results.db"
            cfg = config_for(clip, db, workdir, not args.no_look_ahead)
            if args.tune:
                seconds = len(ref) / ref.fps / 3
                subprocess.run([*EDGEVA, "tune", "--config", str(cfg), "--seconds", f"{seconds:.2f}", "--write"],
                               check=False, stdout=subprocess.DEVNULL)
            out = subprocess.run([*EDGEVA, "run", "--config", str(cfg), "--until-end", "--log-level", "warning"],
                                 check=True, timeout=1800, stdout=subprocess.PIPE, text=True).stdout
            inferred: set[int] = set()
            for q, (task, _) in QUERIES.items():
                reference = query_values(ref, q)
                rows = {r["seq"]: r for r in read_results(db, q, limit=10 * len(reference))}
                inferred |= {s for s, r in rows.items() if r["outcome"] == "inferred"}
                outcomes = [r["outcome"] for r in rows.values()]
                scored = [task.agreement(reference[s], r["value"]) for s, r in rows.items()
                          if r["outcome"] != "dropped" and s < len(reference)]
                # A frame without a result counts as a miss: agreement 0.
                missing = len(reference) - len(scored)
                agreement = (sum(scored)) / len(reference) if reference else 1.0
                print(f"| {clip.name} | {q} | {len(reference)} | {outcomes.count('inferred')} | "
                      f"{outcomes.count('reused')} | {missing} | {agreement:.3f} |", flush=True)
            images = re.search(r"^model \S+: (\d+) images", out, re.M)
            cameras.append((clip.name, len(inferred), int(images.group(1)) if images else None))
    # What the camera cost: the model runs a frame several queries keep once; audits are model runs too.
    print("\n| clip (camera) | frames any query inferred | images the model ran (audits included) |")
    print("| --- | --- | --- |")
    for name, union, images in cameras:
        print(f"| {name} | {union} | {images if images is not None else '?'} |")


if __name__ == "__main__":
    main()
