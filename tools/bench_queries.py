#!/usr/bin/env python3
"""Benchmarks of the query path, each printing ratios measured in the same run.

(a) filter: per clip, tune the threshold on a tuning segment, then measure on held-out
    frames the % of frames skipped and the agreement with the every-frame reference, next
    to every-k sampling that infers as many frames. Real clips: thresholds are tuned on
    ../shared/videos/tune and measured on ../shared/videos/eval (never tuned on).
(b) pipeline: the edgeva daemon (filter + batching executor) on a clip with two queries
    against the naive baseline (the model's predict on every frame, one query after the
    other): frames/s ratio at the agreement the pipeline measured.

The model is the real COCO detector in ../shared/weights when present; without it, the
generated clips are judged with a background-subtraction detector that follows their
ground truth (a random-weight network finds nothing and would make every filter look perfect).

    .venv/bin/python tools/bench_queries.py [--seconds 20] [--plot out/filter_curves.png]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeva.config import TaskConfig, load_config  # noqa: E402
from edgeva.filtering import Differencer, simulate_filter, tune_threshold, uniform_sources  # noqa: E402
from edgeva.models.tasks import build_task  # noqa: E402
from edgeva.tuning import read_segment, reference_values  # noqa: E402

SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov8n_int8_openvino_model"
TARGET = 0.9


@dataclass
class FilterRow:
    clip: str
    tuned_on: str
    frames: int
    threshold: float | None
    skip: float
    agreement: float
    every_k: float


def load_detector():
    from edgeva.models import build_model

    if WEIGHTS.exists():
        return build_model("yolov8n", weights=str(WEIGHTS)), "yolov8n int8 (COCO, ../shared/weights)"
    return None, "none"


def blob_detector(spec):
    sys.path.insert(0, str(REPO / "tests"))
    from blob_model import BlobDetector  # the tests' scene-following stand-in

    from edgeva.synthetic import render_background

    return BlobDetector(render_background(spec))


def measure(frames, values, task, threshold, max_skip=30):
    diff = Differencer()
    prepared = [diff.prepare(f) for f in frames]

    def pair(i, j):
        return diff.area(prepared[i], prepared[j])

    n = len(frames)
    source = simulate_filter(pair, n, threshold if threshold is not None else -1.0, max_skip)
    inferred = sum(1 for i, s in enumerate(source) if i == s)
    agree = np.mean([task.agreement(values[i], values[s]) for i, s in enumerate(source)])
    uni = uniform_sources(n, inferred)
    every_k = np.mean([task.agreement(values[i], values[s]) for i, s in enumerate(uni)])
    return 1 - inferred / n, float(agree), float(every_k)


def tune(frames, values, task):
    diff = Differencer()
    prepared = [diff.prepare(f) for f in frames]
    return tune_threshold(prepared, values, task.agreement, TARGET, feature="area", differencer=diff)


def bench_filter(seconds: float, model, plot_points: dict) -> list[FilterRow]:
    from edgeva.synthetic import PRESETS, SceneSpec, ensure_clip

    rows: list[FilterRow] = []
    # Generated clips: tune on the first part, measure on the rest (ground truth is known).
    for preset in ("demo", "quiet"):
        spec: SceneSpec = PRESETS[preset]
        clip, _ = ensure_clip(spec, REPO / "videos" / f"bench_{preset}.mp4")
        det = blob_detector(spec)
        task = build_task(TaskConfig(type="count", classes=["car"]), det, preset)
        frames = read_segment(str(clip), seconds=2 * seconds)
        half = len(frames) // 2
        values = reference_values(det, task, frames)
        tuned = tune(frames[:half], values[:half], task)
        plot_points[f"{preset} (blob)"] = [(p.skip_fraction, p.agreement) for p in tuned.curve]
        skip, agree, every_k = measure(frames[half:], values[half:], task, tuned.threshold)
        rows.append(FilterRow(f"synthetic {preset}", "first half", len(frames) - half, tuned.threshold,
                              skip, agree, every_k))
    if model is None or not (SHARED / "videos").exists():
        return rows
    task = build_task(TaskConfig(type="count", classes=["car", "person", "truck", "bus"]), model, "real")
    tune_clips = sorted((SHARED / "videos" / "tune").glob("*"))
    eval_clips = sorted((SHARED / "videos" / "eval").glob("*"))
    # One threshold from all tuning clips (their curves pooled), applied unchanged to eval clips.
    pooled_frames, pooled_values = [], []
    for clip in tune_clips:
        frames = read_segment(str(clip), seconds=seconds)
        values = reference_values(model, task, frames)
        tuned = tune(frames, values, task)
        plot_points[f"tune/{clip.stem[:24]}"] = [(p.skip_fraction, p.agreement) for p in tuned.curve]
        skip, agree, every_k = measure(frames, values, task, tuned.threshold)
        rows.append(FilterRow(f"tune/{clip.name}", "itself", len(frames), tuned.threshold, skip, agree, every_k))
        pooled_frames.append(frames)
        pooled_values.append(values)
    per_clip = [tune(f, v, task).threshold for f, v in zip(pooled_frames, pooled_values)]
    chosen = min((t for t in per_clip if t is not None), default=None)  # the strictest clip decides
    for clip in eval_clips:
        frames = read_segment(str(clip), seconds=seconds)
        values = reference_values(model, task, frames)
        skip, agree, every_k = measure(frames, values, task, chosen)
        rows.append(FilterRow(f"eval/{clip.name}", "tune/ (strictest)", len(frames), chosen, skip, agree, every_k))
    return rows


def bench_pipeline(seconds: float, model, tune_clip: Path, clip: Path) -> dict:
    """Daemon with two queries vs predict on every frame for each query; thresholds from tune_clip."""
    from edgeva.daemon import Daemon
    from edgeva.sinks import read_results
    from edgeva.systemd import Notifier

    frames = read_segment(str(clip), seconds=1e9)   # the whole clip, as the daemon replays it
    n = len(frames)
    tasks = {"cars": TaskConfig(type="count", classes=["car", "truck", "bus"]),
             "people": TaskConfig(type="presence", classes=["person"])}
    built = {q: build_task(t, model, q) for q, t in tasks.items()}

    t0 = time.perf_counter()
    reference = {q: [] for q in tasks}
    for f in frames:                      # naive: every frame, each query on its own
        for q, task in built.items():
            reference[q].append(task.value(model.predict([f])[0]))
    naive_s = time.perf_counter() - t0

    tune_frames = read_segment(str(tune_clip), seconds=seconds)
    thresholds = {q: tune(tune_frames, reference_values(model, task, tune_frames), task).threshold
                  for q, task in built.items()}

    tmp = Path(tempfile.mkdtemp(prefix="edgeva-pipe-"))
    import edgeva.models as zoo

    zoo_build = zoo.build_model
    zoo.build_model = lambda *a, **k: model   # the same loaded detector as the baseline
    try:
        cfg_path = tmp / "bench.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "cameras": [{"id": "cam", "source": str(clip), "replay": "fast"}],
            "queries": [{"id": q, "camera": "cam", "model": "yolov8n", "task": {"type": t.type, "classes": t.classes},
                         "accuracy_target": TARGET, "sla": {"latency_ms": 60000},
                         "filter": {"threshold": thresholds[q], "feature": "area"}} for q, t in tasks.items()],
            "stats": {"endpoint": f"ipc://{tmp}/ctl.sock"},
            "sinks": {"sqlite": str(tmp / "r.db"), "flush_s": 0.2}}))
        cfg = load_config(cfg_path)
        daemon = Daemon(cfg, notifier=Notifier({}))
        t0 = time.perf_counter()
        daemon.start()
        daemon.serve(exit_when_sources_end=True)
        pipe_s = time.perf_counter() - t0
    finally:
        zoo.build_model = zoo_build
    agreement = {}
    for q, task in built.items():
        rows = {r["seq"]: r for r in read_results(tmp / "r.db", q, limit=10 * n)}
        agreement[q] = float(np.mean([task.agreement(rows[i]["value"], reference[q][i]) for i in range(n) if i in rows]))
    snap = daemon.stats.snapshot()["queries"]
    assert all(snap[q]["frames_in"] == n and snap[q]["dropped_total"] == 0 for q in tasks), snap
    return {"thresholds": thresholds, "frames": n, "naive_fps": n / naive_s, "pipeline_fps": n / pipe_s, "speedup": naive_s / pipe_s,
            "agreement": agreement, "skipped": {q: snap[q]["reused"] / max(1, snap[q]["frames_in"]) for q in tasks},
            "inferred": {q: snap[q]["inferred"] for q in tasks}}


def plot(points: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in points.items():
        ax.plot([100 * s for s, _ in pts], [a for _, a in pts], marker=".", label=name)
    ax.axhline(TARGET, linestyle="--", color="grey", linewidth=0.8)
    ax.set_xlabel("frames skipped (%)")
    ax.set_ylabel("agreement with every-frame reference")
    ax.set_ylim(0.5, 1.01)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--plot", default="out/filter_curves.png")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()

    model, model_name = load_detector()
    print(f"reference model: {model_name}; target agreement {TARGET}")
    points: dict = {}
    rows = bench_filter(args.seconds, model, points)
    print("\n(a) filter: tuned threshold, measured on held-out frames")
    print(f"{'clip':<58} {'tuned on':<18} {'frames':>6} {'thresh':>8} {'skip %':>7} {'agree':>6} {'every-k':>7}")
    for r in rows:
        thr = "-" if r.threshold is None else f"{r.threshold:.4f}"
        print(f"{r.clip:<58} {r.tuned_on:<18} {r.frames:>6} {thr:>8} {100 * r.skip:>6.1f}% "
              f"{r.agreement:>6.3f} {r.every_k:>7.3f}")
    plot(points, args.plot)
    print(f"curves: {args.plot}")
    result = {"filter": [r.__dict__ for r in rows]}
    if model is not None and (SHARED / "videos").exists():
        clip = SHARED / "videos" / "eval" / "intel_car-detection.mp4"
        tune_clip = SHARED / "videos" / "tune" / "ahmetozlu_vehicle_counting_input_video.mp4"
        pipe = bench_pipeline(args.seconds, model, tune_clip, clip)
        print(f"\n(b) pipeline vs naive on eval/{clip.name} ({pipe['frames']} frames, 2 queries; "
              f"thresholds tuned on tune/{tune_clip.name})")
        print(f"naive {pipe['naive_fps']:.1f} fps, edgeva {pipe['pipeline_fps']:.1f} fps: "
              f"x{pipe['speedup']:.2f} at agreement {json.dumps({k: round(v, 3) for k, v in pipe['agreement'].items()})}"
              f", skipped {json.dumps({k: round(v, 3) for k, v in pipe['skipped'].items()})}")
        result["pipeline"] = pipe
    else:
        print("\n(b) pipeline vs naive: skipped (needs ../shared/weights and ../shared/videos)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
