#!/usr/bin/env python3
"""Whether what the filter learns pays off on a camera that keeps running: each clip replayed
several times in a row as one camera, figures per pass.

tools/bench_filtering.py measures each clip once, calibration included: on a 15-60 s clip the
first window and the bursts that follow are a large share of the frames. A daemon watches its
camera for months, and a fixed camera shows the same road again and again. Here each clip is
played `--loops` times back to back (the background model and every query's filter carry on
across the cut), the camera's three queries replayed together as the daemon runs them
(bench_filtering.run_camera_phases, averaged over the first `--phases` start frames). Per pass:
each query's inferences and agreement against uniform sampling at the same agreement on that
pass, and the camera's model runs against one uniform sampler serving all its queries. A filter
whose learning pays off costs less on the later passes than on the first; one that keeps
re-profiling what it has seen does not.

    .venv/bin/python tools/bench_filter_steady.py [--clips eval|tune|FOLDER] [--loops 4] [--phases 8] [--look-ahead]
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_filtering import (  # noqa: E402
    QUERIES, QUERY_TASK, TARGET, QueryReplay, answer_changes, clips_folder, clips_in, decode, load_or_compute,
    query_values, run_camera_phases, uniform_curve, uniform_needs,
)

from edgeva.config import FilterConfig  # noqa: E402
from edgeva.filtering import Differencer, SceneTracker, default_feature  # noqa: E402


@dataclass(frozen=True)
class Pass:
    inferences: float     # averaged over the start frames (the first pass scaled to the whole clip)
    agreement: float


def sources(kept: frozenset, start: int, frames: int) -> list[int]:
    """For each frame from `start` on, the frame whose answer it carries: the last kept one at or
    before it (`kept` counts from `start`, whose first frame is always kept)."""
    marks = set(k + start for k in kept)
    out, last = [], start
    for i in range(start, frames):
        if i in marks:
            last = i
        out.append(last)
    return out


def pass_frames(start: int, loop: int, clip_frames: int) -> range:
    """The frames of pass `loop` that a run from start frame `start` sees (the first pass misses
    the frames before `start`; its counts are scaled to the whole clip, as
    bench_filtering.run_camera_phases does)."""
    return range(max(start, loop * clip_frames), (loop + 1) * clip_frames)


def passes(kept_by_start: tuple[frozenset, ...], values: list[Any], agree: Callable[[Any, Any], float],
           clip_frames: int, answered_by: tuple[tuple[int, ...], ...] = ()) -> list[Pass]:
    """Per pass of a looped clip (`values` is the clip's answers `len(values) // clip_frames` times
    over): inferences and agreement, averaged over the runs from start frames 0, 1, ... (one per
    entry of `kept_by_start`). `answered_by` (a query that looks ahead): per start frame, the frame
    whose answer each frame takes, counted from that start; without it, the last kept one."""
    total = len(values)
    loops = total // clip_frames
    inferred = np.zeros((len(kept_by_start), loops))
    agreed = np.zeros((len(kept_by_start), loops))
    for start, kept in enumerate(kept_by_start):
        source = ([s + start for s in answered_by[start]] if answered_by else sources(kept, start, total))
        for loop in range(loops):
            span = pass_frames(start, loop, clip_frames)
            scale = clip_frames / len(span)
            inferred[start, loop] = sum(1 for i in span if source[i - start] == i) * scale
            agreed[start, loop] = float(np.mean([agree(values[i], values[source[i - start]]) for i in span]))
    return [Pass(float(inferred[:, k].mean()), float(agreed[:, k].mean())) for k in range(loops)]


def camera_runs(kept_sets: list[tuple[frozenset, ...]], clip_frames: int, loops: int) -> list[float]:
    """Per pass: frames any of the camera's queries kept (or audited: pass those sets too), averaged
    over the start frames, the first pass scaled to the whole clip."""
    starts = len(kept_sets[0])
    runs = np.zeros((starts, loops))
    for start in range(starts):
        frames = frozenset().union(*(frozenset(k + start for k in sets[start]) for sets in kept_sets))
        for loop in range(loops):
            span = pass_frames(start, loop, clip_frames)
            runs[start, loop] = sum(1 for i in frames if i in span) * clip_frames / len(span)
    return [float(runs[:, k].mean()) for k in range(loops)]


def _uniform_curve_if_changing(values: list[Any], agree: Callable[[Any, Any], float]):
    """Uniform sampling's curve on one pass, or None where the answer never changes (such pairs
    are left out of the ratios, as in tools/bench_filtering.py)."""
    return uniform_curve(values, agree) if answer_changes(values, agree) else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clips", default="eval", help="eval, tune, or a folder of clips")
    ap.add_argument("--loops", type=int, default=4, help="times each clip is played back to back")
    ap.add_argument("--phases", type=int, default=8, help="average over the first N start frames")
    ap.add_argument("--look-ahead", action="store_true",
                    help="the camera's queries look ahead (bench_filtering.py --look-ahead): a folder of "
                         "recordings replayed fast as one camera")
    args = ap.parse_args()
    folder = clips_folder(args.clips)
    clips = clips_in(folder)
    if not clips:
        sys.exit(f"no clips in {folder}")
    pair_totals = np.zeros((args.loops, 2))      # per pass: edgeva's inferences, uniform's need
    camera_totals = np.zeros((args.loops, 3))    # per pass: model runs with audits, one uniform sampler (at the
                                                 # agreements reached; at the target)
    missed: list[set[str]] = [set() for _ in range(args.loops)]
    print("| clip (camera) | pass | model runs (with audits) | one uniform sampler | ratio | one uniform sampler "
          "at the target | ratio | pairs: inferences | uniform, same agreements | ratio | lowest agreement |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for clip in clips:
        ref = load_or_compute(clip, verbose=False)
        frames = decode(clip)[:len(ref)]
        n = len(frames)
        scene = SceneTracker(Differencer())
        prepared = [scene.prepare(f) for _ in range(args.loops) for f in frames]
        replays = []
        for query, (task, _) in QUERIES.items():
            values = list(query_values(ref, query)[:n]) * args.loops
            replays.append(QueryReplay(values, task.agreement, FilterConfig(), default_feature(QUERY_TASK[query])))
        runs = run_camera_phases(prepared, scene, replays, ref.fps, args.phases, look_ahead=args.look_ahead)
        per_query = [passes(run.kept, replay.values, replay.agree, n, run.answered_by)
                     for run, replay in zip(runs, replays)]
        model = camera_runs([run.kept for run in runs] + [run.audited for run in runs], n, args.loops)
        curves = [_uniform_curve_if_changing(r.values[:n], r.agree) for r in replays]
        for loop in range(args.loops):
            inferred = need_total = 0.0
            camera_need, at_target, lowest = 1.0, 1.0, 1.0
            for query, curve, figures in zip(QUERIES, curves, per_query):
                lowest = min(lowest, figures[loop].agreement)
                if figures[loop].agreement < TARGET:
                    missed[loop].add(f"{clip.name}/{query}")
                if curve is None:
                    continue
                need = uniform_needs(curve, figures[loop].agreement)
                camera_need = max(camera_need, need)
                at_target = max(at_target, uniform_needs(curve, TARGET))
                inferred += figures[loop].inferences
                need_total += need
            pair_totals[loop] += (inferred, need_total)
            camera_totals[loop] += (model[loop], camera_need, at_target)
            print(f"| {clip.name} | {loop + 1} | {model[loop]:.0f} | {camera_need:.0f} | {model[loop] / camera_need:.2f} | "
                  f"{at_target:.0f} | {model[loop] / at_target:.2f} | "
                  f"{inferred:.0f} | {need_total:.0f} | {inferred / need_total if need_total else float('nan'):.2f} | "
                  f"{lowest:.3f} |", flush=True)
    print()
    for loop in range(args.loops):
        (inf, need), (runs_, uni, target_uni) = pair_totals[loop], camera_totals[loop]
        print(f"pass {loop + 1}: per pair {inf:.0f} inferences against {need:.0f} for uniform sampling at the same "
              f"agreements (ratio {inf / need:.2f}); per camera {runs_:.0f} model runs with audits against {uni:.0f} "
              f"(ratio {runs_ / uni:.2f}), {target_uni:.0f} at the target (ratio {runs_ / target_uni:.2f}); "
              f"target {TARGET} missed on: {', '.join(sorted(missed[loop])) or 'none'}")


if __name__ == "__main__":
    main()
