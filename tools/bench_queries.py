#!/usr/bin/env python3
"""The query pipeline against the strongest simple baseline, on a real clip with the real detector.

Baseline: the detector once per frame in batches of 8, its output shared by every query (what a
careful hand-written loop does; running predict once per query would flatter edgeva).
edgeva: the daemon replaying the clip (`replay: fast`) with the same queries and no threshold
configured: each query calibrates on the camera and then filters. Reported: frames/s of each,
the ratio, and each query's strict agreement with the baseline's every-frame answers.
(Filtering itself is measured against uniform sampling by tools/bench_filtering.py.)

    .venv/bin/python tools/bench_queries.py [--clip ../shared/videos/eval/intel_car-detection.mp4]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeva.config import TaskConfig, load_config  # noqa: E402
from edgeva.models.tasks import build_task  # noqa: E402
from edgeva.tuning import read_segment  # noqa: E402

SHARED = REPO.parent / "shared"
WEIGHTS = SHARED / "weights" / "yolov8n_int8_openvino_model"
TARGET = 0.9


def bench_pipeline(model, clip: Path) -> dict:
    """Daemon with two queries (calibrating on the camera) vs one shared predict per frame."""
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
    for i in range(0, n, 8):              # baseline: every frame once, shared by the queries
        outputs = model.predict(frames[i:i + 8])
        for q, task in built.items():
            reference[q].extend(task.value(out) for out in outputs)
    naive_s = time.perf_counter() - t0

    tmp = Path(tempfile.mkdtemp(prefix="edgeva-pipe-"))
    import edgeva.models as zoo

    zoo_build = zoo.build_model
    zoo.build_model = lambda *a, **k: model   # the same loaded detector as the baseline
    try:
        cfg_path = tmp / "bench.yaml"
        cfg_path.write_text(yaml.safe_dump({
            "cameras": [{"id": "cam", "source": str(clip), "replay": "fast"}],
            "queries": [{"id": q, "camera": "cam", "model": "yolov8n", "task": {"type": t.type, "classes": t.classes},
                         "accuracy_target": TARGET, "sla": {"latency_ms": 60000}} for q, t in tasks.items()],
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
    return {"frames": n, "naive_fps": n / naive_s, "pipeline_fps": n / pipe_s, "speedup": naive_s / pipe_s,
            "agreement": agreement, "skipped": {q: snap[q]["reused"] / max(1, snap[q]["frames_in"]) for q in tasks},
            "inferred": {q: snap[q]["inferred"] for q in tasks}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", type=Path, default=SHARED / "videos" / "eval" / "intel_car-detection.mp4")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    if not WEIGHTS.exists() or not args.clip.exists():
        print("needs ../shared/weights and the clip: skipped")
        return 0
    from edgeva.models import build_model

    model = build_model("yolov8n", weights=str(WEIGHTS))
    pipe = bench_pipeline(model, args.clip)
    print(f"{args.clip.name} ({pipe['frames']} frames), YOLOv8n INT8, 2 queries (count car/truck/bus, "
          f"person present), target {TARGET}")
    print(f"baseline (one predict per frame, shared) {pipe['naive_fps']:.1f} fps, edgeva {pipe['pipeline_fps']:.1f} fps: "
          f"x{pipe['speedup']:.2f} at agreement {json.dumps({k: round(v, 3) for k, v in pipe['agreement'].items()})}"
          f", inferred {json.dumps(pipe['inferred'])}")
    if args.json:
        Path(args.json).write_text(json.dumps(pipe, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
