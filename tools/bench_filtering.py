#!/usr/bin/env python3
"""Frame filtering against the strongest simple baselines, on real clips, with the strict metric.

For each clip and query (vehicle count car/bus/truck, person count, person presence; the real
INT8 detector at confidence 0.3; target 0.9), every policy is replayed over the detector's cached
every-frame outputs (tools/reference_cache.py) and scored with the task's own agreement:
  (a) edgeva: the daemon's QueryFilter, run as a user would: no threshold configured (it
      calibrates on the camera), or `--tuned-first-third` (settings tuned on the clip's first
      third, as `edgeva tune` then `edgeva run` does); audit inferences count as inferences;
      averaged over the clip started at each of its first 8 frames (`--phases`), as (b) is over
      its phase, so one lucky or unlucky run does not count. `--bound-only S` puts an adaptive
      interval in (a)'s place: the same filter configured with no change feature
      (`threshold: .inf`, `max_age_s: S`), k adapted online by the checks at the bound.
      `--look-ahead`: (a) answers a skipped frame only once the next inferred frame's result is
      in, bisecting the gaps whose ends disagree, its tuner replaying that (run_camera; what
      `filter.look_ahead` does in the daemon);
  (b) uniform sampling: infer every k-th frame, averaged over the phase;
  (c) motion-gated (Frigate-like): infer when any changed region exceeds a fixed area;
  (d) the hindsight oracle: infer exactly when the reused answer would pull the running mean
      agreement below the target;
  (e) a fixed interval as a user would configure one (DeepStream's `interval`), chosen without
      hindsight: every k-th frame, k the largest at which the pair meets the target on the
      clip's first third (the data `edgeva tune --seconds <a third>` sees), used on the whole
      clip; and one k for every clip, the largest at which every development pair (tune/)
      meets the target. (b) picks each pair's interval in hindsight; (e) cannot;
  (f) the ceiling of edgeva's kind of filter (tools/hindsight_settings.py): its setting (feature,
      threshold, staleness bound) chosen with the every-frame results, one for the whole clip,
      and one per calibration-window-long segment, each segment at the target.
Reported per pair: inferences and agreement of (a), what (b) needs for the same agreement (and
for one frame of agreement less and more: where (b)'s curve is a cliff near 1), the ratio, (d)'s and (f)'s ratios, and (e)'s inferences and agreement. Plus a PNG of the curves.
Per camera (clip), what the model really runs: a frame several of its queries keep runs once
(the executors' `predict_each_frame_once`), so (a)'s cost is the frames any of the camera's
queries kept, those whose answer never changes included; against one uniform sampler serving
every query of the camera at the agreement (a) reached on it (the densest need).

    .venv/bin/python tools/bench_filtering.py [--clips eval|tune] [--plot out/filter_curves.png] [--look-ahead]
"""
from __future__ import annotations

import argparse
import bisect
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))

from edgeva.config import FilterConfig  # noqa: E402
from edgeva.filtering import Differencer, QueryFilter, SceneTracker, audit_draw, default_feature  # noqa: E402
from edgeva.models.tasks import CountTask, PresenceTask  # noqa: E402
from edgeva.filtering.tuner import bisect_sources  # noqa: E402
from edgeva.filtering.windows import longest_age, tunable_features  # noqa: E402
from hindsight_settings import Choice, best_in_hindsight  # noqa: E402
from reference_cache import SHARED, ClipReference, load_or_compute  # noqa: E402

TARGET = 0.9
CONFIDENCE = 0.3
QUERIES: dict[str, tuple[type, list[str]]] = {
    "vehicles": (CountTask, ["car", "bus", "truck"]),
    "persons": (CountTask, ["person"]),
    "person-present": (PresenceTask, ["person"]),
}
QUERY_TASK = {"vehicles": "count", "persons": "count", "person-present": "presence"}
# The camera id tools/check_filter_daemon.py gives every clip: the replay draws the daemon's audits.
DAEMON_CAMERA = "cam"
FRIGATE_THRESHOLD = 30        # Frigate's defaults: intensity change, and a contour area in a 100-px-high frame
FRIGATE_CONTOUR_AREA = 10


def query_values(ref: ClipReference, query: str) -> list[Any]:
    task, classes = QUERIES[query]
    ids = [ref.class_names.index(c) for c in classes]
    out = []
    for d in ref.detections:
        confident = d.class_ids[d.scores >= CONFIDENCE]
        if task is CountTask:
            out.append({ref.class_names[i]: int((confident == i).sum()) for i in ids})
        else:
            out.append(bool(np.isin(confident, ids).any()))
    return out


def decode(clip: Path) -> list[np.ndarray]:
    cap = cv2.VideoCapture(str(clip))
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image)
    cap.release()
    return frames


def mean_agreement(agree: Callable[[Any, Any], float], values: list[Any], source: list[int]) -> float:
    return float(np.mean([agree(values[i], values[s]) for i, s in enumerate(source)]))


def bisect_gaps(values: list[Any], agree: Callable[[Any, Any], float], inferred: Iterable[int],
                free: Iterable[int] = ()) -> tuple[set[int], list[int]]:
    """Looking ahead (edgeva.filtering.tuner.bisect_sources, on the cached every-frame answers):
    between consecutive `inferred` frames (the clip's last frame added: the end of a recording
    closes its gap) whose answers disagree, infer the frame midway, recursively, until every gap's
    ends agree; each frame then takes its gap's answer. `free`: frames whose result is there
    anyway (another query's model runs): a gap holding one is split there first. Returns the
    frames inferred (free ones used included) and, per frame, the frame whose answer it takes."""
    kept = sorted(set(inferred))
    reused = [kept[max(0, bisect.bisect_right(kept, i) - 1)] if kept else i for i in range(len(values))]
    source = bisect_sources(reused, values, agree, list(free))
    return set(source), source


@dataclass
class Run:
    inferences: float   # model runs whose result is the query's answer (calibration included)
    agreement: float
    audits: float = 0   # model runs that only checked a reused answer
    kept_by_reason: Optional[dict] = None   # where the inferences went (calibrate, threshold, stale, ...)
    kept: tuple[frozenset, ...] = ()         # per start frame: the frames inferred (from that start frame)
    audited: tuple[frozenset, ...] = ()      # per start frame: the frames audited
    answered_by: tuple[tuple[int, ...], ...] = ()   # looking ahead, per start frame: the frame whose
                                                     # answer each frame takes (empty: the last kept one)


@dataclass(frozen=True)
class PairResult:
    """One pair's figures against the baselines (a pair whose answer changes)."""

    run: Run                            # (a), edgeva
    uniform_need: float                 # (b) at (a)'s agreement
    oracle: Run                         # (d)
    oracle_uniform_need: float          # (b) at (d)'s agreement
    first_third: tuple[float, float]    # (e) (inferences, agreement), the interval from the first third
    fixed: tuple[float, float]          # (e), the one interval chosen on tune/
    ceilings: list[tuple[Choice, float]]   # (f) one setting, a setting per window: (choice, (b) at its agreement)
    one_frame: tuple[float, float]      # (b) at (a)'s agreement one frame lower, higher


@dataclass(frozen=True)
class PairRow:
    clip: str
    query: str
    frames: int
    result: Optional[PairResult]        # None: the answer never changes


@dataclass(frozen=True)
class QueryReplay:
    """One query of a replayed camera: its every-frame answers and how its filter is set up."""

    values: list[Any]
    agree: Callable[[Any, Any], float]
    cfg: FilterConfig
    preferred: Optional[str]


def run_edgeva_phases(prepared, prepared_by, values, agree, fps: float, cfg: FilterConfig, preferred,
                      phases: int, camera: str = DAEMON_CAMERA) -> Run:
    """One query alone on its camera: `run_camera_phases` with a single query."""
    return run_camera_phases(prepared, prepared_by, [QueryReplay(values, agree, cfg, preferred)], fps, phases,
                             camera)[0]


def run_camera_phases(prepared, prepared_by, queries: list[QueryReplay], fps: float, phases: int,
                      camera: str = DAEMON_CAMERA, share: bool = True, look_ahead: bool = False) -> list[Run]:
    """`run_camera` from each of the first `phases` frames (the camera starting a frame later),
    averaged per query, as uniform sampling is over its phase: which frames a filter happens to
    infer decides what it reuses, and on a flickering answer (a person detected every other frame)
    one run's agreement is a lottery. Inferences are scaled to the whole clip."""
    n = len(prepared)
    runs = [run_camera(prepared[p:], prepared_by, [replace(q, values=q.values[p:]) for q in queries], fps,
                       camera=camera, start=p, share=share, look_ahead=look_ahead) for p in range(phases)]
    scale = [n / (n - p) for p in range(phases)]
    averaged = []
    for k in range(len(queries)):
        mine = [run[k] for run in runs]
        reasons: dict[str, float] = {}
        for run, factor in zip(mine, scale):
            for reason, count in (run.kept_by_reason or {}).items():
                reasons[reason] = reasons.get(reason, 0.0) + count * factor / phases
        averaged.append(Run(float(np.mean([r.inferences * f for r, f in zip(mine, scale)])),
                            float(np.mean([r.agreement for r in mine])),
                            float(np.mean([r.audits * f for r, f in zip(mine, scale)])),
                            {reason: round(count, 1) for reason, count in reasons.items()},
                            tuple(k for run in mine for k in run.kept), tuple(a for run in mine for a in run.audited),
                            tuple(s for run in mine for s in run.answered_by)))
    return averaged


def model_runs(runs: list[Run], frames: int, audits: bool = False) -> float:
    """Frames any of a camera's queries inferred (`audits`: or audited), per start frame scaled
    to the whole clip and averaged: the model runs once on a frame several queries keep."""
    phases = len(runs[0].kept)
    sets = [r.kept for r in runs] + ([r.audited for r in runs] if audits else [])
    return float(np.mean([len(frozenset().union(*(s[p] for s in sets))) * frames / (frames - p)
                          for p in range(phases)]))


def run_edgeva(prepared, prepared_by, values, agree, fps: float, cfg: FilterConfig, preferred,
               camera: str = DAEMON_CAMERA, start: int = 0) -> Run:
    """One query alone on its camera: `run_camera` with a single query."""
    return run_camera(prepared, prepared_by, [QueryReplay(values, agree, cfg, preferred)], fps, camera, start)[0]


def run_camera(prepared, prepared_by, queries: list[QueryReplay], fps: float, camera: str = DAEMON_CAMERA,
               start: int = 0, share: bool = True, look_ahead: bool = False) -> list[Run]:
    """The daemon's QueryFilters of one camera's queries over the clip, the model answering
    instantly from the cache. As in the daemon, the queries decide each frame in their configured
    order, and (`share`) a query later in that order learns whether the model already runs on the
    frame for one before it (edgeva.query.FrameView.model_runs). The frames' audit draws are the
    daemon's for `camera` (its queries audit the same frames); the clip starts at frame `start`.
    A query's inferences count every frame whose answer came from the model, shared ones too.
    `look_ahead`: each query's filter looks ahead (QueryFilter's `look_ahead`) and its gaps are
    bisected (`bisect_gaps`), the bisection's frames counted as inferred ("bisect"); a frame two
    queries bisect is one model run. The bisection's results are not fed back to the filters."""
    filters = [QueryFilter(q.cfg, differencer=prepared_by.differencer, agreement=q.agree, target=TARGET, fps=fps,
                           preferred_feature=q.preferred, look_ahead=look_ahead) for q in queries]
    refs = [-1] * len(queries)
    totals = [0.0] * len(queries)
    kept: list[list[int]] = [[] for _ in queries]
    audited: list[list[int]] = [[] for _ in queries]
    for i, p in enumerate(prepared):
        draw = audit_draw(camera, start + i)
        runs_here = False
        for k, (q, filt) in enumerate(zip(queries, filters)):
            decision = filt.decide(p, draw, model_runs=share and runs_here)
            if decision.keep or refs[k] < 0:
                filt.mark_inferred(p)
                filt.record_result(p, q.values[i])
                refs[k] = i
                kept[k].append(i)
                runs_here = True
            elif decision.audit:
                audited[k].append(i)
                filt.record_audit(q.agree(q.values[i], q.values[refs[k]]))
                runs_here = True
            totals[k] += q.agree(q.values[i], q.values[refs[k]])
    runs = [Run(len(kept[k]), totals[k] / len(prepared), len(audited[k]), filt.stats()["kept_by_reason"],
                (frozenset(kept[k]),), (frozenset(audited[k]),)) for k, filt in enumerate(filters)]
    if look_ahead:
        for k, q in enumerate(queries):
            taken, source = bisect_gaps(q.values, q.agree, kept[k])
            reasons = dict(runs[k].kept_by_reason or {}, bisect=len(taken) - len(kept[k]))
            runs[k] = replace(runs[k], inferences=len(taken), agreement=mean_agreement(q.agree, q.values, source),
                              kept_by_reason=reasons, kept=(frozenset(taken),), answered_by=(tuple(source),))
    return runs


def tuned_on_first_third(prepared, values, agree, fps: float, cfg: FilterConfig) -> FilterConfig:
    """What `edgeva tune --seconds <a third of the clip> --write` puts into the config."""
    from edgeva.config import parse_config
    from edgeva.tuning import tune_query

    third = len(prepared) // 3
    q = parse_config({"cameras": [{"id": "c", "source": "rtsp://x/y"}],
                      "queries": [{"id": "q", "camera": "c", "model": "yolov8n", "accuracy_target": TARGET,
                                   "task": {"type": "count", "classes": ["car"]}}]}).queries[0]
    q = replace(q, filter=cfg)
    tuning = tune_query(q, prepared[:third], values[:third], agree, fps, Differencer(width=cfg.width))
    return replace(cfg, threshold=None, max_age_s=None, tuned=tuning.start())


def every_k(values, agree, k: int) -> tuple[float, float]:
    """(inferences, agreement) of inferring every k-th frame, averaged over up to 8 phases."""
    n = len(values)
    phases = sorted({int(p) for p in np.linspace(0, k - 1, min(k, 8))})
    runs = []
    for phase in phases:
        source = [0 if i < phase else phase + ((i - phase) // k) * k for i in range(n)]
        runs.append(mean_agreement(agree, values, source))
    inferred = np.mean([len(set([0] + list(range(ph, n, k)))) for ph in phases])
    return float(inferred), float(np.mean(runs))


def uniform_curve(values, agree) -> list[tuple[float, float]]:
    """(inferences, agreement) of every-k sampling for k = 1, 2, ..., phase-averaged."""
    points = []
    for k in range(1, len(values) + 1):
        points.append(every_k(values, agree, k))
        if points[-1][1] < 0.5 or k > 600:
            break
    return points


def clips_folder(name: str) -> Path:
    """`--clips`: eval and tune are ../shared/videos' folders, anything else a folder path."""
    return SHARED / "videos" / name if name in ("eval", "tune") else Path(name)


def answer_changes(values: list[Any], agree: Callable[[Any, Any], float]) -> bool:
    """Whether a pair's answer ever differs from its first: pairs whose answer never changes are
    left out of the ratios (any sampler agrees fully there)."""
    return any(agree(v, values[0]) < 1.0 for v in values)


def clips_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*") if p.suffix in (".mp4", ".avi", ".mkv", ".mov"))


def largest_interval(pairs: list[tuple[list[Any], Callable[[Any, Any], float]]], longest: int = 600) -> int:
    """The largest k (at most `longest` or the shortest sequence) at which every-k-th-frame
    sampling meets the target, phase-averaged, on every (values, agreement) pair."""
    best = 1
    for k in range(2, min([longest] + [len(values) for values, _ in pairs]) + 1):
        if not all(every_k(values, agree, k)[1] >= TARGET for values, agree in pairs):
            break
        best = k
    return best


def fixed_interval_on(folder: Path) -> int:
    """One interval for every camera: the largest k meeting the target on every pair of
    `folder`'s clips whose answer changes, what a user would configure after trying intervals
    on their development clips."""
    pairs = []
    for clip in clips_in(folder):
        ref = load_or_compute(clip, verbose=False)
        for query, (task, _) in QUERIES.items():
            values = query_values(ref, query)
            if any(task.agreement(v, values[0]) < 1.0 for v in values):
                pairs.append((values, task.agreement))
    return largest_interval(pairs)


def bound_only_config(max_age_s: float) -> FilterConfig:
    """Every-k sampling whose k the daemon adapts online, as a user configures it: no change feature
    (`threshold: .inf`), so no calibration either; the staleness bound `max_age_s` shortened and
    grown back by the checks at the bound, with the audits and confirmations of any configured
    setting. The strongest simple baseline that needs no hindsight."""
    return FilterConfig(threshold=math.inf, max_age_s=max_age_s)


def uniform_needs_one_frame_either_way(curve, agreement: float, frames: int) -> tuple[float, float]:
    """What uniform sampling needs for `agreement` one frame lower and one frame higher (one frame
    fully wrong or right more, 1/frames of agreement). Where an answer is one value but for a few
    flickering frames, uniform's curve is a cliff near 1 and these two differ by orders of
    magnitude: the comparison at the same agreement then turns on single frames."""
    step = 1.0 / max(frames, 1)
    return uniform_needs(curve, agreement - step), uniform_needs(curve, min(1.0, agreement + step))


def uniform_needs(curve, agreement: float) -> float:
    """Fewest inferences with which uniform sampling reaches `agreement` (interpolated)."""
    pts = sorted(curve)                      # by inferences, ascending
    best = pts[-1][0]
    for (n0, a0), (n1, a1) in zip(pts, pts[1:]):
        if a1 >= agreement > a0:
            best = min(best, n0 + (n1 - n0) * (agreement - a0) / (a1 - a0))
    for n_, a_ in pts:
        if a_ >= agreement:
            best = min(best, n_)
    return best


def motion_gated_curve(frames, values, agree) -> list[tuple[float, float]]:
    """Frigate-style: 100-px-high gray frame vs a running-average background; infer when any
    motion contour exceeds an area (swept), else reuse."""
    small = []
    for f in frames:
        h, w = f.shape[:2]
        g = cv2.cvtColor(cv2.resize(f, (max(1, round(w * 100 / h)), 100), interpolation=cv2.INTER_NEAREST),
                         cv2.COLOR_BGR2GRAY)
        small.append(cv2.GaussianBlur(g, (3, 3), 0))
    areas = [0.0]
    bg = small[0].astype(np.float32)
    for g in small[1:]:
        mask = cv2.threshold(cv2.absdiff(cv2.convertScaleAbs(bg), g), FRIGATE_THRESHOLD, 255, cv2.THRESH_BINARY)[1]
        mask = cv2.dilate(mask, None, iterations=2)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        areas.append(max((cv2.contourArea(c) for c in contours), default=0.0))
        cv2.accumulateWeighted(g.astype(np.float32), bg, 0.2 if areas[-1] == 0 else 0.01)
    points = []
    for area in sorted({FRIGATE_CONTOUR_AREA, *np.geomspace(1, 4000, 25)}):
        source, ref = [], 0
        for i, a in enumerate(areas):
            if i == 0 or a > area:
                ref = i
            source.append(ref)
        points.append((float(len(set(source))), mean_agreement(agree, values, source)))
    return points


def oracle(values, agree, target: float = TARGET) -> Run:
    ref, total, inferred = 0, 0.0, 0
    for i, v in enumerate(values):
        a = agree(v, values[ref]) if i else 1.0
        if i == 0 or (total + a) / (i + 1) < target:
            ref, a = i, 1.0
            inferred += 1
        total += a
    return Run(inferred, total / len(values))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", default="eval", help="eval, tune, or a folder of clips")
    start = ap.add_mutually_exclusive_group()
    start.add_argument("--tuned-first-third", action="store_true",
                       help="(a) uses settings tuned on each clip's first third instead of calibrating online")
    ap.add_argument("--plot", type=Path)
    ap.add_argument("--calibration-s", type=float, default=FilterConfig.calibration_s)
    ap.add_argument("--phases", type=int, default=8,
                    help="average (a) over the clip started at each of its first N frames (1: one run from "
                         "the first frame, what tools/check_filter_daemon.py runs)")
    ap.add_argument("--every", type=int, default=1,
                    help="keep every N-th frame of each clip, replayed at 1/N of its frame rate: the same scenes "
                         "from a camera that sends fewer frames (a check on cameras unlike the clips)")
    start.add_argument("--bound-only", type=float, metavar="SECONDS",
                       help="(a) is every query configured as `filter: {threshold: .inf, max_age_s: SECONDS}` "
                            "(bound_only_config): every-k sampling with k adapted online")
    ap.add_argument("--no-sharing", action="store_true",
                    help="each query decides as if alone on its camera (no shared keeps of frames the model "
                         "runs on for another query)")
    ap.add_argument("--look-ahead", action="store_true",
                    help="(a) looks ahead: each query's tuner replays the bisection of gaps whose ends disagree, "
                         "no changed answer is confirmed, and every gap is bisected (run_camera): the daemon's filter.look_ahead, "
                         "its default for a recording replayed fast (with --tuned-first-third, `edgeva tune` still "
                         "chooses the start without the bisection, as tuning.tune_query does)")
    args = ap.parse_args()
    folder = clips_folder(args.clips)
    clips = clips_in(folder)
    if not clips:
        sys.exit(f"no clips in {folder}")
    interval = fixed_interval_on(SHARED / "videos" / "tune")
    print(f"fixed interval chosen on tune/: every {interval} frame(s)")
    if args.look_ahead:
        print("edgeva looks ahead: gaps whose ends disagree bisected, the tuner replaying it, no confirmations")
    rows = []
    cameras = []
    curves: dict[str, dict[str, Any]] = {}
    for clip in clips:
        ref = load_or_compute(clip)
        frames = decode(clip)[:len(ref)][::args.every]
        fps = ref.fps / args.every
        scene = SceneTracker(Differencer())
        prepared = [scene.prepare(f) for f in frames]
        base = FilterConfig(calibration_s=args.calibration_s)     # also what the ceilings replay
        configured = base if args.bound_only is None else bound_only_config(args.bound_only)
        replays = []
        for query, (task, _) in QUERIES.items():
            values = query_values(ref, query)[:len(ref)][::args.every]
            cfg = (tuned_on_first_third(prepared, values, task.agreement, fps, configured) if args.tuned_first_third
                   else configured)
            replays.append(QueryReplay(values, task.agreement, cfg, default_feature(QUERY_TASK[query])))
        camera_runs = run_camera_phases(prepared, scene, replays, fps, args.phases, camera=DAEMON_CAMERA,
                                        share=not args.no_sharing, look_ahead=args.look_ahead)
        camera_needs, at_target = [1.0], [1.0]
        for query, replay, run in zip(QUERIES, replays, camera_runs):
            values, agree = replay.values, replay.agree
            if not answer_changes(values, agree):
                rows.append(PairRow(clip.name, query, len(values), None))
                continue
            uni = uniform_curve(values, agree)
            need = uniform_needs(uni, run.agreement)
            camera_needs.append(need)
            at_target.append(uniform_needs(uni, TARGET))
            orc = oracle(values, agree)
            orc_need = uniform_needs(uni, orc.agreement)
            first_third = every_k(values, agree, largest_interval([(values[:len(values) // 3], agree)]))
            fixed = every_k(values, agree, interval)
            ceilings = [best_in_hindsight(prepared, values, agree, scene.differencer, tunable_features(base, prepared),
                                          fps, TARGET, longest_age(base, fps), segment_s, each_segment=True)
                        for segment_s in (None, base.calibration_s)]
            ceilings_need = [uniform_needs(uni, c.agreement) for c in ceilings]
            one_frame = uniform_needs_one_frame_either_way(uni, run.agreement, len(values))
            rows.append(PairRow(clip.name, query, len(values),
                                PairResult(run, need, orc, orc_need, first_third, fixed,
                                           list(zip(ceilings, ceilings_need)), one_frame)))
            curves[f"{clip.stem[:24]} {query}"] = {
                "uniform": uni, "motion": motion_gated_curve(frames, values, agree),
                "edgeva": (run.inferences, run.agreement), "oracle": (orc.inferences, orc.agreement),
                "n": len(values)}
            print(f"{clip.name[:34]:34} {query:15} edgeva {run.inferences:6.1f} (+{run.audits:.1f} audits) @ {run.agreement:.3f}  "
                  f"uniform needs {need:6.1f} (one frame either way {one_frame[0]:.1f}-{one_frame[1]:.1f})  "
                  f"ratio {run.inferences / need:.2f}  "
                  f"oracle {orc.inferences}/{orc_need:.0f} = {orc.inferences / orc_need:.2f}  "
                  f"in hindsight {' '.join(_ceiling(c, n) for c, n in zip(ceilings, ceilings_need))}  "
                  f"kept {run.kept_by_reason}", flush=True)
        cameras.append((clip.name, model_runs(camera_runs, len(prepared)), max(camera_needs),
                        model_runs(camera_runs, len(prepared), audits=True), max(at_target)))
        print(f"{clip.name[:34]:34} camera: model runs {cameras[-1][1]:6.1f} ({cameras[-1][3]:6.1f} with audits), "
              f"one uniform sampler {cameras[-1][2]:6.1f}", flush=True)
    _summary(rows)
    _camera_summary(cameras)
    if args.plot:
        _plot(curves, args.plot)


def _ceiling(choice: Choice, need: float) -> str:
    return f"{choice.inferences} @ {choice.agreement:.3f} ({choice.inferences / need:.2f})"


def _summary(rows: list[PairRow]) -> None:
    changing = [r.result for r in rows if r.result is not None]
    print()
    print("| clip | query | frames | edgeva inferences | + audits | agreement | uniform, same agreement | ratio | "
          "ratio with audits | oracle ratio | interval from first third | one setting in hindsight (ratio) | "
          "a setting per window in hindsight (ratio) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        res, n = row.result, row.frames
        if res is None:
            print(f"| {row.clip} | {row.query} | {n} | answer never changes | | | | | | | | | |")
            continue
        run, need, first_third = res.run, res.uniform_need, res.first_third
        print(f"| {row.clip} | {row.query} | {n} | {run.inferences:.0f} ({100 * run.inferences / n:.1f} %) | {run.audits:.0f} | "
              f"{run.agreement:.3f} | {need:.0f} | {run.inferences / need:.2f} | "
              f"{(run.inferences + run.audits) / need:.2f} | {res.oracle.inferences / res.oracle_uniform_need:.2f} | "
              f"{first_third[0]:.0f} @ {first_third[1]:.3f} | {_ceiling(*res.ceilings[0])} | {_ceiling(*res.ceilings[1])} |")
    if changing:
        named = [(f"{r.clip}/{r.query}", r.result) for r in rows if r.result is not None]
        total = sum(r.run.inferences for r in changing)
        audits = sum(r.run.audits for r in changing)
        total_uniform = sum(r.uniform_need for r in changing)
        total_oracle = sum(r.oracle.inferences for r in changing)
        total_oracle_uniform = sum(r.oracle_uniform_need for r in changing)
        missed = [name for name, r in named if r.run.agreement < TARGET]
        thirds = sum(r.first_third[0] for r in changing)
        thirds_missed = [name for name, r in named if r.first_third[1] < TARGET]
        total_fixed = sum(r.fixed[0] for r in changing)
        fixed_missed = [name for name, r in named if r.fixed[1] < TARGET]
        ceilings = [(sum(r.ceilings[k][0].inferences for r in changing), sum(r.ceilings[k][1] for r in changing))
                    for k in range(2)]
        one_frame = [sum(r.one_frame[k] for r in changing) for k in range(2)]
        print(f"\nover the {len(changing)} pairs whose answer changes: edgeva {total:.0f} inferences (+{audits:.0f} audits), "
              f"uniform at the same agreement {total_uniform:.0f} (ratio {total / total_uniform:.2f}, "
              f"{(total + audits) / total_uniform:.2f} with audits); oracle ratio "
              f"{total_oracle / total_oracle_uniform:.2f}; target {TARGET} missed on: {', '.join(missed) or 'none'}; "
              f"intervals chosen on each clip's first third {thirds:.0f} inferences (edgeva {total / thirds:.2f}x of it), "
              f"target missed on: {', '.join(thirds_missed) or 'none'}; one interval chosen on tune/ {total_fixed:.0f} "
              f"inferences (edgeva {total / total_fixed:.2f}x of it), target missed on: {', '.join(fixed_missed) or 'none'}; "
              f"in hindsight, one setting per clip {ceilings[0][0]} inferences (ratio {ceilings[0][0] / ceilings[0][1]:.2f}), "
              f"one per window {ceilings[1][0]} (ratio {ceilings[1][0] / ceilings[1][1]:.2f}); "
              f"each pair's agreement one frame lower / higher: uniform needs {one_frame[0]:.0f} / {one_frame[1]:.0f} "
              f"(ratio {total / one_frame[0]:.2f} / {total / one_frame[1]:.2f})")


def _camera_summary(cameras) -> None:
    """Per camera: edgeva's model runs against one uniform sampler serving all its queries at the
    agreements edgeva reached, and (stricter where edgeva lands above the target) at the target."""
    print("\n| clip (camera) | model runs (frames any query kept) | with audits | one uniform sampler for all its "
          "queries | ratio | ratio with audits | one uniform sampler at the target | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for clip, runs, uniform, with_audits, at_target in cameras:
        print(f"| {clip} | {runs:.0f} | {with_audits:.0f} | {uniform:.0f} | {runs / uniform:.2f} | "
              f"{with_audits / uniform:.2f} | {at_target:.0f} | {with_audits / at_target:.2f} |")
    runs, uniform = sum(c[1] for c in cameras), sum(c[2] for c in cameras)
    with_audits, at_target = sum(c[3] for c in cameras), sum(c[4] for c in cameras)
    print(f"\nper camera, all its queries: edgeva runs the model {runs:.0f} times ({with_audits:.0f} with audits), "
          f"one uniform sampler per camera {uniform:.0f} (ratio {runs / uniform:.2f}, {with_audits / uniform:.2f} "
          f"with audits); one meeting the target on every query of its camera {at_target:.0f} (ratio with audits "
          f"{with_audits / at_target:.2f})")


def _plot(curves, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = (len(curves) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, c) in zip(axes.flat, curves.items()):
        n = c["n"]
        for label, pts, style in (("uniform (phase-averaged)", c["uniform"], "-"), ("motion-gated", c["motion"], ":")):
            pts = sorted(pts)
            ax.plot([100 * p[0] / n for p in pts], [p[1] for p in pts], style, label=label)
        ax.plot(100 * c["edgeva"][0] / n, c["edgeva"][1], "o", label="edgeva")
        ax.plot(100 * c["oracle"][0] / n, c["oracle"][1], "*", markersize=10, label="oracle")
        ax.axhline(TARGET, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xscale("log")
        ax.set_ylim(max(0.0, min(0.6, c["edgeva"][1] - 0.05)), 1.005)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("frames inferred (%)")
        ax.set_ylabel("strict agreement")
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
