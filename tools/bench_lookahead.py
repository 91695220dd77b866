#!/usr/bin/env python3
"""What looking ahead buys a sampler: every k-th frame, and the gaps whose ends disagree bisected.

The daemon answers a skipped frame with the last inferred result as soon as that result is in.
A sampler allowed to hold a skipped frame's answer until the *next* inferred frame's result is in
(batch replay, or a live query whose SLA latency covers the stride) can do better: where two
consecutive inferred frames agree, the frames between take that answer; where they disagree, it
infers the frame midway and recurses on both halves until each gap's ends agree. A change that
lasts is then located to the frame at about log2(k) extra inferences; an excursion that starts and
ends between two inferred frames (a one-frame ghost) is missed, as it is by uniform sampling.

Replayed over the detector's cached every-frame outputs (tools/reference_cache.py), with the same
queries, metric and baselines as tools/bench_filtering.py. A camera's queries run in the daemon's
order and share the model's runs as the daemon's do (filtering step 8): a frame an earlier query
had inferred splits a later query's gap at no model run, and counts as one of its inferences, as
bench_filtering counts shared answers. Averaged over the clip started at each of its first
`--phases` frames. Per stride in `--strides`, one summary line: per pair (pairs whose answer
changes) and per camera (frames any query inferred, against one uniform sampler at the densest
interval its queries need for the agreements reached), the lowest pair's agreement (averaged, and
the lowest single start frame), and the pairs over 1x; the per-pair table at `--stride`.

This is a baseline, not the daemon, which looks ahead with its learned filter
(`filter.look_ahead`; docs/filtering.md, "Looking ahead"): no pixels and no learning, one stride
for every clip. Choose the stride on tune/ (the largest at which every development pair meets the
target) and read eval/ at it.

    .venv/bin/python tools/bench_lookahead.py [--clips eval|tune] [--strides 2,3,4,6,8] [--stride 3] [--no-sharing]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_filtering import (QUERIES, TARGET, answer_changes, bisect_gaps, clips_folder, clips_in,  # noqa: E402
                             mean_agreement, query_values, uniform_curve, uniform_needs)
from reference_cache import load_or_compute  # noqa: E402

Agree = Callable[[Any, Any], float]


def look_ahead(values: Sequence[Any], agree: Agree, stride: int,
               free: Sequence[int] = ()) -> tuple[set[int], list[int]]:
    """Every `stride`-th frame from frame 0, and the clip's last frame (end of the recording);
    gaps between two inferred frames that disagree are bisected until every gap's ends agree
    (bench_filtering.bisect_gaps). `free`: frames whose result is there anyway (another query's
    model runs): a gap holding one is split there first. Returns the frames inferred (free ones
    used included) and, per frame, the inferred frame whose answer it takes."""
    return bisect_gaps(list(values), agree, range(0, len(values), max(1, stride)), free)


def camera_look_ahead(queries: Sequence[tuple[Sequence[Any], Agree]], stride: int,
                      share: bool = True) -> list[tuple[set[int], float]]:
    """The camera's queries in order, each later one taking the frames the model already ran
    (`share`; else each as if alone)."""
    ran: set[int] = set()
    out = []
    for values, agree in queries:
        inferred, source = look_ahead(values, agree, stride, free=sorted(ran) if share else ())
        ran |= inferred
        out.append((inferred, mean_agreement(agree, list(values), source)))
    return out


def camera_phases(queries: Sequence[tuple[Sequence[Any], Agree]], stride: int, phases: int, share: bool = True):
    """`camera_look_ahead` from each of the first `phases` frames, scaled to the whole clip:
    per query (mean inferences, mean agreement, lowest agreement), and the camera's model runs."""
    n = len(queries[0][0])
    per_query: list[list[tuple[float, float]]] = [[] for _ in queries]
    runs = []
    for p in range(min(phases, n - 1)):
        scale = n / (n - p)
        result = camera_look_ahead([(values[p:], agree) for values, agree in queries], stride, share)
        for k, (inferred, agreement) in enumerate(result):
            per_query[k].append((len(inferred) * scale, agreement))
        runs.append(len(set().union(*(inferred for inferred, _ in result))) * scale)
    stats = [(float(np.mean([r[0] for r in rows])), float(np.mean([r[1] for r in rows])), min(r[1] for r in rows))
             for rows in per_query]
    return stats, float(np.mean(runs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clips", default="eval", help="eval, tune, or a folder of clips")
    ap.add_argument("--strides", default="2,3,4,6,8")
    ap.add_argument("--stride", type=int, default=3, help="the stride whose per-pair table is printed")
    ap.add_argument("--phases", type=int, default=8)
    ap.add_argument("--no-sharing", action="store_true", help="each query as if alone on its camera")
    args = ap.parse_args()
    strides = sorted({int(s) for s in args.strides.split(",")} | {args.stride})
    cameras = []
    for clip in clips_in(clips_folder(args.clips)):
        ref = load_or_compute(clip, verbose=False)
        queries = []
        for query, (task, _) in QUERIES.items():
            values = query_values(ref, query)[:len(ref)]
            queries.append((query, values, task.agreement, answer_changes(values, task.agreement),
                            uniform_curve(values, task.agreement)))
        cameras.append((clip.name, queries))
    for stride in strides:
        if stride == args.stride:
            print(f"stride {stride}, per pair ('lowest': the lowest single start frame; 'uniform': what uniform sampling needs "
                  f"for the same agreement)\n{'clip':36} {'query':15} {'inferences':>10} {'agreement':>9} {'lowest':>7} "
                  f"{'uniform':>8} {'ratio':>6}")
        pairs = need = runs = camera_need = 0.0
        lowest_mean, lowest_single, over = (1.0, ""), (1.0, ""), []
        for name, queries in cameras:
            stats, camera_runs = camera_phases([(v, a) for _, v, a, _, _ in queries], stride, args.phases,
                                                not args.no_sharing)
            needs = [1.0]
            for (query, values, _, changes, curve), (inferences, agreement, low) in zip(queries, stats):
                lowest_mean = min(lowest_mean, (agreement, f"{name} {query}"))
                lowest_single = min(lowest_single, (low, f"{name} {query}"))
                if not changes:
                    if stride == args.stride:
                        print(f"{name[:36]:36} {query:15} {inferences:10.1f} {agreement:9.3f} {low:7.3f}   answer never changes")
                    continue
                u = uniform_needs(curve, agreement)
                needs.append(u)
                pairs += inferences
                need += u
                if inferences > u:
                    over.append(f"{name} {query} {inferences / u:.2f}x")
                if stride == args.stride:
                    print(f"{name[:36]:36} {query:15} {inferences:10.1f} {agreement:9.3f} {low:7.3f} {u:8.1f} {inferences / u:6.2f}")
            runs += camera_runs
            camera_need += max(needs)
        print(f"stride {stride}: per pair {pairs:.0f} inferences against uniform's {need:.0f} at the same agreements "
              f"(ratio {pairs / need:.2f}); per camera {runs:.0f} model runs against {camera_need:.0f} "
              f"({runs / camera_need:.2f}); lowest pair {lowest_mean[0]:.3f} ({lowest_mean[1]}), lowest single start "
              f"{lowest_single[0]:.3f} ({lowest_single[1]}); target {TARGET} "
              f"{'met on every pair' if lowest_mean[0] >= TARGET else 'MISSED'}; over 1x: {', '.join(over) or 'none'}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
