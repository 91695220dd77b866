#!/usr/bin/env python3
"""Every-frame detector outputs for a clip, computed once and cached.

Filtering is judged against the same model run on every frame. Running the real INT8 detector
costs ~25 ms a frame on 2 cores, so the filter benchmarks replay policies over these cached
outputs instead of re-running the model for every policy and threshold.

    .venv/bin/python tools/reference_cache.py ../shared/videos/eval/*.mp4 [--weights DIR]

Cache: var/refs/<clip name>.<weights name>.npz with, per frame, every box scoring at least
MIN_SCORE (so any query confidence >= MIN_SCORE can be evaluated), plus the clip's fps.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeva.models.outputs import Detections  # noqa: E402

SHARED = REPO.parent / "shared"
DEFAULT_WEIGHTS = SHARED / "weights" / "yolov8n_int8_openvino_model"
CACHE = REPO / "var" / "refs"
MIN_SCORE = 0.1


@dataclass
class ClipReference:
    clip: Path
    fps: float
    detections: list[Detections]   # one per frame, boxes scoring >= MIN_SCORE
    class_names: list[str]

    def __len__(self) -> int:
        return len(self.detections)


def cache_path(clip: Path, weights: Path) -> Path:
    return CACHE / f"{clip.name}.{weights.name}.npz"


def load_or_compute(clip: Path, weights: Path = DEFAULT_WEIGHTS, batch: int = 8, verbose: bool = True) -> ClipReference:
    path = cache_path(clip, weights)
    if path.exists() and path.stat().st_mtime >= clip.stat().st_mtime:
        return _load(clip, path)
    from edgeva.models import build_model

    model = build_model("yolov8n", weights=str(weights))
    model.min_score = MIN_SCORE
    cap = cv2.VideoCapture(str(clip))
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    dets: list[Detections] = []
    started = time.monotonic()
    pending: list[np.ndarray] = []
    while True:
        ok, image = cap.read()
        if ok:
            pending.append(image)
        if pending and (len(pending) == batch or not ok):
            dets.extend(model.predict(pending))
            pending = []
        if not ok:
            break
    cap.release()
    if verbose:
        print(f"{clip.name}: {len(dets)} frames in {time.monotonic() - started:.1f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = np.array([len(d) for d in dets], np.int64)
    np.savez_compressed(
        path, fps=fps, counts=counts, class_names=np.array(model.class_names),
        boxes=np.concatenate([d.boxes for d in dets]) if dets else np.zeros((0, 4), np.float32),
        scores=np.concatenate([d.scores for d in dets]) if dets else np.zeros(0, np.float32),
        class_ids=np.concatenate([d.class_ids for d in dets]) if dets else np.zeros(0, np.int64))
    return ClipReference(clip, fps, dets, list(model.class_names))


def _load(clip: Path, path: Path) -> ClipReference:
    z = np.load(path)
    ends = np.cumsum(z["counts"])
    starts = ends - z["counts"]
    dets = [Detections(z["boxes"][a:b], z["scores"][a:b], z["class_ids"][a:b]) for a, b in zip(starts, ends)]
    return ClipReference(clip, float(z["fps"]), dets, [str(n) for n in z["class_names"]])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("clips", nargs="+", type=Path)
    ap.add_argument("--weights", type=Path, default=DEFAULT_WEIGHTS)
    args = ap.parse_args()
    for clip in args.clips:
        ref = load_or_compute(clip, args.weights)
        print(f"{clip.name}: {len(ref)} frames at {ref.fps:g} fps -> {cache_path(clip, args.weights)}")


if __name__ == "__main__":
    main()
