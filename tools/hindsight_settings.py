"""The ceiling of edgeva's kind of filter: its settings chosen in hindsight.

A setting is what the daemon's filter decides with: a change feature, a threshold on it and a
staleness bound (edgeva.filtering.tuner replays exactly that rule). Here the settings are chosen
with the every-frame results of the whole clip, which no online filter has:
- one setting for the whole clip: the best any tuning of a single setting could do;
- a setting per segment (Reducto's `ReductoOptimal`: each segment's best, segments of 5 s as in
  Reducto's simulator, each starting with an inference): the best a content-adaptive lookup could
  do if it always found each segment's right setting.
Both infer the fewest frames whose mean agreement over the whole clip reaches the target (the
per-segment choice is an exact multiple-choice knapsack over the segments' settings).

If even these need more inferences than uniform sampling at the same agreement, no tuning of
threshold and bound can beat uniform sampling on that clip; the gap between them and edgeva is
what learning online costs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from edgeva.filtering import Differencer
from edgeva.filtering.tuner import (NO_THRESHOLD, PairCache, ReplayScorer, age_candidates, default_candidates,
                                   simulate_filter)

REDUCTO_SEGMENT_S = 5.0


@dataclass(frozen=True)
class Choice:
    inferences: int
    agreement: float        # mean over the clip's frames


def segment_options(frames: Sequence[Any], values: Sequence[Any], agree: Callable[[Any, Any], float],
                    differencer: Differencer, features: Sequence[str], longest: int) -> dict[int, float]:
    """For each number of inferences some setting makes on this segment, the highest summed
    agreement a setting with that many inferences reaches."""
    cache = PairCache(frames, differencer)
    score = ReplayScorer(values, agree)
    best: dict[int, float] = {}
    thresholds = [*default_candidates(), NO_THRESHOLD]
    seen_sources: set[tuple[int, ...]] = set()
    for feature in features:
        pair_value = cache.value_fn(feature)
        for age in age_candidates(min(longest, len(frames) - 1)):
            for threshold in thresholds:
                source = tuple(simulate_filter(pair_value, len(frames), threshold, age))
                if source in seen_sources:
                    continue
                seen_sources.add(source)
                total = float(score(list(source)).sum())
                inferred = sum(1 for i, s in enumerate(source) if i == s)
                best[inferred] = max(best.get(inferred, -math.inf), total)
    return best


def fewest_inferences(options: Sequence[dict[int, float]], n_frames: int, target: float) -> Choice:
    """Pick one option per segment: the fewest inferences in total whose summed agreement reaches
    target * n_frames (exact: a table over the total number of inferences)."""
    most = sum(max(o) for o in options)
    table = np.full(most + 1, -np.inf)
    table[0] = 0.0
    for segment in options:
        nxt = np.full(most + 1, -np.inf)
        for inferred, agreement in segment.items():
            shifted = np.full(most + 1, -np.inf)
            shifted[inferred:] = table[:most + 1 - inferred] + agreement
            np.maximum(nxt, shifted, out=nxt)
        table = nxt
    meeting = np.nonzero(table >= target * n_frames - 1e-9)[0]
    if not len(meeting):
        return Choice(n_frames, 1.0)
    k = int(meeting[0])
    return Choice(k, float(table[k]) / n_frames)


def best_in_hindsight(prepared: Sequence[Any], values: Sequence[Any], agree: Callable[[Any, Any], float],
                      differencer: Differencer, features: Sequence[str], fps: float, target: float,
                      longest: int, segment_s: float | None, each_segment: bool = False) -> Choice:
    """The fewest inferences reaching `target` over the clip with one setting (`segment_s` None)
    or one setting per `segment_s` segment, chosen in hindsight; with `each_segment`, every
    segment reaches the target on its own (Reducto's labels) instead of the clip as a whole."""
    n = len(prepared)
    size = n if segment_s is None else max(2, int(round(segment_s * fps)))
    options = [segment_options(prepared[k:k + size], values[k:k + size], agree, differencer, features, longest)
               for k in range(0, n, size)]
    if each_segment:
        lengths = [len(prepared[k:k + size]) for k in range(0, n, size)]
        picks = [fewest_inferences([o], length, target) for o, length in zip(options, lengths)]
        return Choice(sum(p.inferences for p in picks), sum(p.agreement * m for p, m in zip(picks, lengths)) / n)
    return fewest_inferences(options, n, target)
