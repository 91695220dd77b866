"""`edgeva tune`: profile a segment of each camera and pick every query's filter threshold.

For each camera: decode a profiling segment, run each of its queries' models on every
frame (the reference), then simulate the filter for every candidate threshold and feature
(edgeva.filtering.tune_features) and keep the one that skips the most frames while the
agreement with the every-frame reference stays at or above the query's accuracy target.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import cv2
import numpy as np
import yaml

from edgeva.config import Config, QueryConfig, is_file_source
from edgeva.filtering import Differencer, TuneResult, default_feature, tune_features
from edgeva.redaction import redact

log = logging.getLogger("edgeva.tuning")


@dataclass
class QueryTuning:
    query: str
    camera: str
    frames: int
    best: TuneResult
    others: list[TuneResult]


def read_segment(source: str, seconds: float, start_s: float = 0.0, max_frames: int = 3000) -> list[np.ndarray]:
    """Decode `seconds` of video from a file (from `start_s`) or a live stream."""
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise RuntimeError(f"cannot open {redact(source)}")
    try:
        fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
        if start_s and is_file_source(source):
            cap.set(cv2.CAP_PROP_POS_FRAMES, int(start_s * fps))
        wanted = min(max_frames, int(seconds * fps))
        frames = []
        while len(frames) < wanted:
            ok, image = cap.read()
            if not ok:
                break
            frames.append(image)
        return frames
    finally:
        cap.release()


def reference_values(model: Any, task: Any, frames: list[np.ndarray], batch: int = 8) -> list[Any]:
    values: list[Any] = []
    for i in range(0, len(frames), batch):
        values.extend(task.value(out) for out in model.predict(frames[i:i + batch]))
    return values


def tune_query(q: QueryConfig, frames: list[np.ndarray], values: list[Any], agreement: Any,
               features: Optional[list[str]] = None) -> QueryTuning:
    differencer = Differencer(width=q.filter.width)
    prepared = [differencer.prepare(f) for f in frames]
    results = tune_features(prepared, values, agreement, q.accuracy_target,
                            features=tuple(features or ("pixel", "area", "edge")),
                            preferred=default_feature(q.task.type), differencer=differencer,
                            max_skip=q.filter.max_skip)
    return QueryTuning(q.id, q.camera, len(frames), results[0], results[1:])


def tune_config(cfg: Config, seconds: float, start_s: float = 0.0,
                only: Optional[set[str]] = None) -> Iterator[QueryTuning]:
    from edgeva.models import build_model
    from edgeva.models.tasks import build_task

    models: dict[str, Any] = {}
    for cam in cfg.cameras:
        queries = [q for q in cfg.queries_for(cam.id)
                   if q.task.type != "passthrough" and (only is None or q.id in only)]
        if not queries:
            continue
        frames = read_segment(cam.source, seconds, start_s)
        log.info("camera %s: %d profiling frames", cam.id, len(frames))
        for q in queries:
            key = f"{q.model}@{q.weights}"
            if key not in models:
                models[key] = build_model(q.model, q.weights, q.download, cfg.gpu.device)
            task = build_task(q.task, models[key], q.id)
            values = reference_values(models[key], task, frames)
            yield tune_query(q, frames, values, task.agreement)


def write_thresholds(config_path: str, tunings: list[QueryTuning]) -> Path:
    """Set filter.threshold/feature of each tuned query in the YAML file (a .bak copy is kept)."""
    path = Path(config_path)
    raw = yaml.safe_load(path.read_text())
    by_id = {t.query: t for t in tunings}
    for q in raw.get("queries", []):
        t = by_id.get(q.get("id"))
        if t is None:
            continue
        filt = q.setdefault("filter", {})
        filt["threshold"] = None if t.best.threshold is None else round(float(t.best.threshold), 6)
        filt["feature"] = t.best.feature
    shutil.copyfile(path, path.with_suffix(path.suffix + ".bak"))
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def format_tunings(tunings: list[QueryTuning]) -> str:
    lines = [f"{'query':<18} {'frames':>6} {'feature':<7} {'threshold':>10} {'skip %':>7} {'agree':>6} "
             f"{'target':>6} {'every-k':>7}  met"]
    for t in tunings:
        b = t.best
        thr = "-" if b.threshold is None else f"{b.threshold:.5f}"
        lines.append(f"{t.query:<18} {t.frames:>6} {b.feature:<7} {thr:>10} {100 * b.skip_fraction:>6.1f}% "
                     f"{b.agreement:>6.3f} {b.target:>6.3f} {b.uniform_agreement:>7.3f}  {'yes' if b.met_target else 'NO'}")
    return "\n".join(lines)


def plot_curves(tunings: list[QueryTuning], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in tunings:
        for r in [t.best, *t.others]:
            xs = [100 * p.skip_fraction for p in r.curve]
            ys = [p.agreement for p in r.curve]
            ax.plot(xs, ys, marker=".", label=f"{t.query} / {r.feature}")
        ax.axhline(t.best.target, linestyle="--", linewidth=0.8, color="grey")
    ax.set_xlabel("frames skipped (%)")
    ax.set_ylabel("agreement with every-frame reference")
    ax.set_title("filter threshold sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
