"""`edgeva tune`: profile a segment of each camera and pick every query's filter setting.

For each camera: decode a profiling segment, run each of its queries' models on every frame
(the reference), then replay the filter for every candidate threshold, staleness bound and
feature (edgeva.filtering.tune_features) and keep the setting that infers the fewest frames while
the agreement with the every-frame reference stays at the query's target plus a margin derived
from the segment. Only what tuning needs is kept while decoding: each frame's small grayscale
copy for the filter and each query's result, never the full-resolution segment.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import cv2
import numpy as np
import yaml

from edgeva.config import Config, QueryConfig, TunedFilter, is_file_source
from edgeva.filtering import (
    Differencer, SceneTracker, TuneResult, age_candidates, default_feature, longest_age, tune_features,
    tunable_features,
)
from edgeva.filtering.profiles import profile_radius, window_key
from edgeva.filtering.tuner import tells_settings_apart
from edgeva.filtering.windows import frames_for
from edgeva.recordings import playable
from edgeva.redaction import redact

log = logging.getLogger("edgeva.tuning")


@dataclass
class QueryTuning:
    query: str
    camera: str
    frames: int
    best: TuneResult
    others: list[TuneResult]
    fps: float
    key: list[float]                     # the segment's key and radius (edgeva.filtering.profiles)
    radius: float
    informed: bool                       # its answer changed enough to tell settings apart

    def start(self) -> TunedFilter:
        """Where the query's filter starts in the daemon (`filter.tuned`); it learns on from there."""
        best = self.best
        if best.threshold is None:        # nothing met the target: infer every frame until it learns more
            threshold, max_age_s = 0.0, 0.0
        else:
            threshold, max_age_s = float(best.threshold), round(best.max_age / self.fps, 3)
        if math.isfinite(threshold):
            threshold = float(f"{threshold:.6g}")
        return TunedFilter(best.feature, threshold, max_age_s, [round(float(v), 5) for v in self.key],
                           round(self.radius, 5), self.informed, round(self.frames / self.fps, 2))


def read_segment(source: str, seconds: float, start_s: float = 0.0, max_frames: int = 3000) -> list[np.ndarray]:
    """Decode `seconds` of video from a file (from `start_s`) or a live stream (full frames: for
    small segments and tests; tuning streams with `iter_segment`)."""
    return list(iter_segment(source, seconds, start_s, max_frames)[1])


def iter_segment(source: str, seconds: float, start_s: float = 0.0,
                 max_frames: int = 100_000) -> tuple[float, Iterator[np.ndarray]]:
    """(fps, frames) of `seconds` of video; frames are decoded one at a time as iterated."""
    source = playable(source)
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise RuntimeError(f"cannot open {redact(source)}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    if start_s and is_file_source(source):
        cap.set(cv2.CAP_PROP_POS_FRAMES, int(start_s * fps))
    wanted = min(max_frames, int(seconds * fps))

    def frames() -> Iterator[np.ndarray]:
        try:
            for _ in range(wanted):
                ok, image = cap.read()
                if not ok:
                    return
                yield image
        finally:
            cap.release()

    return fps, frames()


def reference_values(model: Any, task: Any, frames: list[np.ndarray], batch: int = 8) -> list[Any]:
    values: list[Any] = []
    for i in range(0, len(frames), batch):
        values.extend(task.value(out) for out in model.predict(frames[i:i + batch]))
    return values


@dataclass
class _QueryProfile:
    cfg: QueryConfig
    model: Any
    task: Any
    scene: SceneTracker
    prepared: list[Any]
    values: list[Any]


def tune_query(q: QueryConfig, prepared: list[Any], values: list[Any], agreement: Any, fps: float,
               differencer: Differencer, features: Optional[list[str]] = None) -> QueryTuning:
    """Step 1 of the filter, offline, on a profiled segment: where the query starts. It does not
    replay the bisection of a query that looks ahead (whose own windows do): a setting laxer
    because the bisection locates lasting changes keeps few frames at its staleness bound, and
    those checks are how a query learns what its segment did not show (docs/filtering.md)."""
    longest = min(len(prepared) - 1, longest_age(q.filter, fps))
    if features is None:
        features = list(tunable_features(q.filter, prepared))
    features = [f for f in features if f != "foreground" or (prepared and prepared[0].foreground is not None)]
    results = tune_features(prepared, values, agreement, q.accuracy_target, features=tuple(features),
                            preferred=default_feature(q.task.type), differencer=differencer,
                            max_ages=age_candidates(max(0, longest)), safety_margin="auto")
    key, pieces = window_key(differencer, prepared, frames_for(q.filter.segment_s, fps))
    informed = tells_settings_apart(values, agreement, max(0, longest), q.accuracy_target)
    return QueryTuning(q.id, q.camera, len(prepared), results[0], results[1:], fps, key.tolist(),
                       profile_radius(key, pieces), informed)


def tune_config(cfg: Config, seconds: float, start_s: float = 0.0,
                only: Optional[set[str]] = None, batch: int = 8) -> Iterator[QueryTuning]:
    from edgeva.models import build_model
    from edgeva.models.tasks import build_task

    models: dict[str, Any] = {}
    for cam in cfg.cameras:
        queries = [q for q in cfg.queries_for(cam.id)
                   if q.task.type != "passthrough" and (only is None or q.id in only)]
        if not queries:
            continue
        profiles: list[_QueryProfile] = []
        for q in queries:
            key = f"{q.model}@{q.weights}"
            if key not in models:
                models[key] = build_model(q.model, q.weights, q.download, cfg.gpu.device)
            profiles.append(_QueryProfile(q, models[key], build_task(q.task, models[key], q.id),
                                          SceneTracker(Differencer(width=q.filter.width)), [], []))
        fps, frames = iter_segment(cam.source, seconds, start_s)
        pending: list[np.ndarray] = []
        for image in _with_end(frames):
            if image is not None:
                pending.append(image)
            if pending and (image is None or len(pending) == batch):
                _profile_batch(profiles, pending)
                pending = []
        log.info("camera %s: %d profiling frames", cam.id, len(profiles[0].values))
        for p in profiles:
            yield tune_query(p.cfg, p.prepared, p.values, p.task.agreement, fps, p.scene.differencer)


def _with_end(frames: Iterator[np.ndarray]) -> Iterator[Optional[np.ndarray]]:
    yield from frames
    yield None


def _profile_batch(profiles: list[_QueryProfile], images: list[np.ndarray]) -> None:
    """Run each query's model on a batch (once per distinct model) and keep only the small views."""
    outputs: dict[int, list[Any]] = {}
    for p in profiles:
        if id(p.model) not in outputs:
            outputs[id(p.model)] = p.model.predict(images)
        p.values.extend(p.task.value(out) for out in outputs[id(p.model)])
        p.prepared.extend(p.scene.prepare(image) for image in images)


def write_tunings(config_path: str, tunings: list[QueryTuning]) -> Path:
    """Set each tuned query's `filter.tuned` (where its filter starts; it learns on from there) in
    the YAML file, keeping its comments and layout (ruamel's round trip); a .bak copy of the old
    file is kept. A configured `threshold` is removed (it would fix the setting), and so is a
    `max_age_s` (it would cap every bound learned later; older versions of this command wrote
    both)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    path = Path(config_path)
    raw = yaml_rt.load(path.read_text())
    by_id = {t.query: t for t in tunings}
    for q in raw.get("queries", []) or []:
        t = by_id.get(q.get("id"))
        if t is None:
            continue
        if q.get("filter") is None:
            q["filter"] = {}
        filt = q["filter"]
        for stale in ("threshold", "max_age_s"):
            if filt.get(stale) is not None:
                del filt[stale]
        tuned = CommentedMap(dataclasses.asdict(t.start()))
        tuned["key"] = CommentedSeq(tuned["key"])      # in place, on one line
        tuned["key"].fa.set_flow_style()
        filt["tuned"] = tuned
    shutil.copyfile(path, path.with_suffix(path.suffix + ".bak"))
    with path.open("w") as fh:
        yaml_rt.dump(raw, fh)
    return path


def format_tunings(tunings: list[QueryTuning]) -> str:
    lines = [f"{'query':<18} {'frames':>6} {'feature':<7} {'threshold':>10} {'max age':>8} {'skip %':>7} "
             f"{'agree':>6} {'needed':>6} {'every-k':>7}  met"]
    for t in tunings:
        b = t.best
        thr = "-" if b.threshold is None else "none" if math.isinf(b.threshold) else f"{b.threshold:.5f}"
        lines.append(f"{t.query:<18} {t.frames:>6} {b.feature:<7} {thr:>10} {b.max_age / t.fps:>7.2f}s "
                     f"{100 * b.skip_fraction:>6.1f}% {b.agreement:>6.3f} {b.target:>6.3f} "
                     f"{b.uniform_agreement:>7.3f}  {'yes' if b.met_target else 'NO'}")
    return "\n".join(lines)


def plot_curves(tunings: list[QueryTuning], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for t in tunings:
        for r in [t.best, *t.others]:
            points = [p for p in r.curve if p.max_age == r.max_age] or list(r.curve)
            xs = [100 * p.skip_fraction for p in points]
            ys = [p.agreement for p in points]
            ax.plot(xs, ys, marker=".", label=f"{t.query} / {r.feature}")
        ax.axhline(t.best.target, linestyle="--", linewidth=0.8, color="grey")
    ax.set_xlabel("frames skipped (%)")
    ax.set_ylabel("agreement with every-frame reference")
    ax.set_title("filter threshold sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
