"""Choosing a query's filter setting on a profiled segment: frames with the model's result on
every one of them.

A setting is a change threshold and a staleness bound (the most frames a result may be reused).
Both are chosen together, by replaying the real keep/skip rule over the segment, as the one that
infers the fewest frames while the agreement with the every-frame results stays at the target
plus a margin. Because "no threshold, only the staleness bound" is among the settings, the
choice is never worse on the segment than uniform sampling at the same staleness.

The margin is not a constant: it is the standard error of the chosen setting's agreement
across the segment's pieces, so a segment where agreement swings between pieces asks for more
headroom than a steady one.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .features import FEATURES, Differencer, FeatureName, FeatureVector, Prepared

PairValue = Callable[[int, int], float]
NO_THRESHOLD = math.inf    # only the staleness bound decides: uniform sampling
# A kept frame whose answer differs from the one it replaces is confirmed on the next frame, and
# so on while it keeps changing, at most this many frames in a row (edgeva.filtering.policy). The
# replay below does not count on them: it chooses the setting as if every result were reused as
# inferred, and the confirmations come on top.
CONFIRMATIONS = 2


@dataclass(frozen=True, slots=True)
class Carried:
    """A window's answer on a frame it did not infer: the answer inferred before it. A replay
    reuses it like any answer, but agreement is scored on the inferred frames only: where the
    window skipped, a flicker would have gone unseen, so those frames cannot vouch for a setting."""
    value: Any


def inferred_value(value: Any) -> Any:
    return value.value if isinstance(value, Carried) else value


@dataclass(frozen=True, slots=True)
class CurvePoint:
    threshold: float
    max_age: int                  # frames a result may be reused
    skip_fraction: float
    agreement: float              # mean per-frame agreement with the every-frame reference
    worst_window_agreement: float  # lowest mean over consecutive windows (default 30 frames)
    uniform_agreement: float      # every-k sampling inferring as many frames: the baseline to beat


@dataclass(frozen=True)
class TuneResult:
    feature: FeatureName
    threshold: Optional[float]    # None when no setting met the target: infer every frame
    met_target: bool
    target: float                 # the agreement required, margin included
    skip_fraction: float
    agreement: float
    uniform_agreement: float
    curve: tuple[CurvePoint, ...]
    max_age: int = 0              # staleness bound chosen with the threshold (frames)
    margin: float = 0.0


def default_candidates() -> tuple[float, ...]:
    """0 plus a geometric grid over the range the three features live in (shares of a frame)."""
    return (0.0,) + tuple(float(x) for x in np.geomspace(1e-4, 0.5, 30))


def age_candidates(longest: int) -> tuple[int, ...]:
    """Staleness bounds from 1 frame to `longest`, roughly geometric (12 steps)."""
    if longest <= 0:
        return (0,)
    return tuple(sorted({int(round(x)) for x in np.geomspace(1, longest, 12)}))


def simulate_filter(pair_value: PairValue, n_frames: int, threshold: float, max_skip: int) -> list[int]:
    """Replay the keep/skip rule; returns for each frame the index of the inferred frame whose
    result it carries (itself when inferred)."""
    source: list[int] = []
    ref = -1
    skipped = 0
    for i in range(n_frames):
        if ref < 0 or skipped >= max_skip or (threshold != NO_THRESHOLD and pair_value(ref, i) > threshold):
            ref, skipped = i, 0
        else:
            skipped += 1
        source.append(ref)
    return source


def bisect_sources(source: list[int], values: Sequence[Any], agreement: Callable[[Any, Any], float],
                   free: Sequence[int] = ()) -> list[int]:
    """Looking ahead: a query that answers a skipped frame only once the next inferred frame's
    result is in bisects every gap whose two inferred ends disagree (the frame midway inferred,
    recursively) until each gap's ends agree, and answers the gap's frames with that answer; the
    last frame closes the last gap (the end of a recording). Takes a replay's `source`
    (simulate_filter) and returns it with the gaps bisected; a frame a sparse window skipped
    stands in with its carried answer. `free`: frames whose result is there anyway (another
    query's model runs, in the tools' replays): a gap holding one is split there first."""
    n = len(source)
    free_sorted = sorted(f for f in free if 0 <= f < n)
    ends = sorted(set(source) | ({n - 1} if n else set()))
    out = list(range(n))
    gaps = list(zip(ends, ends[1:]))
    while gaps:
        start, end = gaps.pop()
        if end - start <= 1:
            continue
        i = bisect.bisect_right(free_sorted, start)
        if i < len(free_sorted) and free_sorted[i] < end:
            split = free_sorted[i]
        elif agreement(inferred_value(values[start]), inferred_value(values[end])) < 1.0:
            split = (start + end) // 2
        else:
            out[start + 1:end] = [start] * (end - start - 1)
            continue
        gaps += [(start, split), (split, end)]
    return out


def uniform_sources(n_frames: int, n_inferred: int, phase: int = 0) -> list[int]:
    """Every-k sampling with `n_inferred` evenly spaced inferred frames (the first included),
    shifted by `phase` frames (frames before the first pick reuse frame 0)."""
    if n_frames == 0:
        return []
    picks = np.unique(np.floor(np.linspace(0, n_frames, max(1, n_inferred), endpoint=False)).astype(int))
    picks = np.unique(np.concatenate([[0], np.minimum(picks + phase, n_frames - 1)]))
    return [int(picks[np.searchsorted(picks, i, side="right") - 1]) for i in range(n_frames)]


class PairCache:
    """Memoised pairwise features: candidate walks revisit the same (reference, frame) pairs."""

    def __init__(self, frames: Sequence[Prepared], differencer: Differencer) -> None:
        self.frames = frames
        self.differencer = differencer
        self._vectors: dict[tuple[int, int], FeatureVector] = {}

    def value_fn(self, feature: FeatureName) -> PairValue:
        def value(i: int, j: int) -> float:
            vec = self._vectors.get((i, j))
            if vec is None:
                vec = self.differencer.features(self.frames[i], self.frames[j])
                self._vectors[(i, j)] = vec
            return vec.get(feature)
        return value


class ReplayScorer:
    """Per-frame agreement of a replayed setting with the every-frame results (memoised); NaN on
    a frame whose result was carried over (`Carried`), which is left out of every mean."""

    def __init__(self, values: Sequence[Any], agreement: Callable[[Any, Any], float]) -> None:
        self.values = values
        self.agreement = agreement
        self._memo: dict[tuple[int, int], float] = {}

    def __call__(self, source: list[int]) -> np.ndarray:
        out = np.ones(len(source))
        for i, src in enumerate(source):
            if isinstance(self.values[i], Carried):
                out[i] = np.nan
            elif i != src:
                key = (i, src)
                if key not in self._memo:
                    self._memo[key] = float(self.agreement(self.values[i], inferred_value(self.values[src])))
                out[i] = self._memo[key]
        return out


def bound_only_agreement(values: Sequence[Any], agreement: Callable[[Any, Any], float], max_age: int) -> float:
    """Agreement on one segment of its laxest setting: no threshold, only a staleness bound of
    `max_age` frames (scored like any replay: on the frames whose answer is known)."""
    source = simulate_filter(lambda i, j: 0.0, len(values), NO_THRESHOLD, max_age)
    return _mean(ReplayScorer(values, agreement)(source))


def tells_settings_apart(values: Sequence[Any], agreement: Callable[[Any, Any], float], longest: int,
                         target: float) -> bool:
    """Whether a segment can tell settings apart (is *informed*, edgeva.filtering.profiles): its
    answer changed, and enough that its laxest setting (no threshold, the longest bound) misses the
    target on it. Where that setting keeps the target, so does every other, and the segment says
    nothing about which threshold is safe (one change at its last frame, say). An answer that
    never changed keeps every setting at 1."""
    return bound_only_agreement(values, agreement, longest) < target


def _mean(scores: np.ndarray) -> float:
    """The mean over the scored frames (1 when none is)."""
    scored = scores[~np.isnan(scores)]
    return float(scored.mean()) if len(scored) else 1.0


def _worst_window(scores: np.ndarray, window: int) -> float:
    if not len(scores):
        return 1.0
    return float(min(_mean(scores[k:k + window]) for k in range(0, len(scores), window)))


def piece_standard_error(scores: np.ndarray, pieces: int = 4) -> float:
    """Standard error of the mean agreement, from the spread of its contiguous pieces (frames
    next to each other are not independent, pieces of a segment nearly are)."""
    if len(scores) < 2 * pieces:
        return 0.0
    means = [_mean(p) for p in np.array_split(scores, pieces)]
    return float(np.std(means, ddof=1) / math.sqrt(pieces))


Segment = tuple[Any, Sequence[Any]]   # (prepared frames or a PairValue, the model's result per frame)


def tune_threshold(
    frames: Sequence[Prepared] | PairValue,
    reference_values: Sequence[Any],
    agreement: Callable[[Any, Any], float],
    target: float,
    **kwargs: Any,
) -> TuneResult:
    """Pick the (threshold, staleness bound) for one feature on one profiled segment; see
    `tune_segments`. `frames` is the segment (prepared frames) or a callable giving the feature
    between frame i (reference) and frame j; `reference_values[i]` is the model's output on frame i."""
    if not callable(frames) and len(frames) != len(reference_values):
        raise ValueError(f"{len(frames)} frames but {len(reference_values)} reference values")
    return tune_segments([(frames, reference_values)], agreement, target, **kwargs)


def tune_segments(
    segments: Sequence[Segment],
    agreement: Callable[[Any, Any], float],
    target: float,
    *,
    feature: FeatureName = "area",
    max_skip: int = 30,
    max_ages: Optional[Sequence[int]] = None,
    candidates: Optional[Sequence[float]] = None,
    safety_margin: float | str = 0.0,
    window: int = 30,
    differencer: Optional[Differencer] = None,
    caches: Optional[Sequence[Optional[PairCache]]] = None,
    look_ahead: bool = False,
) -> TuneResult:
    """Pick the (threshold, staleness bound) for `feature` that infers least while keeping agreement
    over one or more profiled segments (each replayed on its own, their frames pooled).

    Every setting is simulated with the real rule (reference = last inferred frame, staleness
    bound); a skipped frame scores agreement(values[i], values[source]).

    For each staleness bound, only thresholds such that they *and every smaller candidate* reach
    the required agreement are trusted (an isolated lucky point above a failing one is not), as is
    no threshold at all when even that passes. Among the trusted settings, the one inferring
    fewest frames wins, preferring the lowest threshold and bound among near-ties. `max_ages`
    defaults to just `max_skip`. `safety_margin="auto"` derives the margin from the data: the
    standard error of the first choice's agreement across the segments (across four pieces of a
    single segment). If no setting meets the target the result says threshold None (infer every
    frame) and met_target False. `look_ahead`: the query bisects the gaps whose ends disagree
    (bisect_sources), so every setting is replayed with its bisection, whose frames count as
    inferred.
    """
    walks: list[tuple[PairValue, int, ReplayScorer]] = []
    observed: list[float] = []
    for k, (frames, values) in enumerate(segments):
        if callable(frames):
            pair_value = frames
        else:
            cache = caches[k] if caches is not None and caches[k] is not None else None
            pair_value = (cache or PairCache(frames, differencer or Differencer())).value_fn(feature)
        walks.append((pair_value, len(values), ReplayScorer(values, agreement)))
    ages = tuple(max_ages) if max_ages is not None else (max_skip,)
    for pair_value, length, _ in walks:
        lags = sorted({1, *(a for a in ages if a > 0)})
        observed.extend(pair_value(i - lag, i) for i in range(length) for lag in lags if i - lag >= 0)
    # How much change the segments showed between a frame and an earlier one: a threshold up
    # to this was tested by them (changes that large came, and the agreement says whether they
    # mattered); above it, it was not.
    tested = float(np.percentile(observed, 95)) if observed else 0.0
    n = sum(w[1] for w in walks)
    grid = sorted(set(float(c) for c in (candidates if candidates is not None else default_candidates())))
    grid.append(NO_THRESHOLD)

    curve: list[CurvePoint] = []
    per_point_scores: list[list[np.ndarray]] = []
    for age in ages:
        for thr in grid:
            parts, uniform_parts, inferred = [], [], 0
            for pair_value, length, score in walks:
                source = simulate_filter(pair_value, length, thr, age)
                if look_ahead:
                    source = bisect_sources(source, score.values, score.agreement)
                seg_inferred = sum(1 for i, s in enumerate(source) if i == s)
                inferred += seg_inferred
                parts.append(score(source))
                uniform_parts.append(score(uniform_sources(length, seg_inferred)))
            scores = np.concatenate(parts) if parts else np.ones(0)
            uniform = np.concatenate(uniform_parts) if uniform_parts else np.ones(0)
            curve.append(CurvePoint(thr, age, 1.0 - inferred / n if n else 0.0,
                                    _mean(scores) if n else 1.0, _worst_window(scores, window),
                                    _mean(uniform) if n else 1.0))
            per_point_scores.append(parts)

    slack = max(1, n // 50) / n if n else 0.0

    def choose(required: float) -> Optional[int]:
        """The setting that skips most, then, among those within `slack` of it, the largest
        threshold the segments tested (see `tested`), else the lowest: a threshold above every
        change the segments showed is untested by them, and would miss the first change they lacked."""
        meeting: list[int] = []
        for age in ages:
            ok = None
            for k, point in enumerate(curve):
                if point.max_age != age:
                    continue
                if point.agreement < required:
                    break
                ok = k
            if ok is not None:
                meeting.extend(k for k, p in enumerate(curve) if p.max_age == age and k <= ok)
        if not meeting:
            return None
        most = max(curve[k].skip_fraction for k in meeting)
        near = [k for k in meeting if curve[k].skip_fraction >= most - slack]
        within = [k for k in near if curve[k].threshold <= tested]
        if within:      # the largest tested threshold: changes that large did not hurt
            return max(within, key=lambda k: (curve[k].threshold, -curve[k].max_age, curve[k].agreement))
        return min(near, key=lambda k: (curve[k].threshold, curve[k].max_age, -curve[k].agreement))

    margin = 0.0 if safety_margin == "auto" else float(safety_margin)
    best = choose(target + margin)
    if safety_margin == "auto" and best is not None:
        parts = per_point_scores[best]
        if len(parts) >= 2:
            means = [_mean(p) for p in parts if len(p)]
            margin = float(np.std(means, ddof=1) / math.sqrt(len(means))) if len(means) >= 2 else 0.0
        else:
            margin = piece_standard_error(parts[0])
        best = choose(target + margin)
    required = target + margin
    if best is None:
        return TuneResult(feature, None, False, required, 0.0, 1.0, 1.0, tuple(curve), 0, margin)
    point = curve[best]
    return TuneResult(feature, point.threshold, True, required, point.skip_fraction, point.agreement,
                      point.uniform_agreement, tuple(curve), point.max_age, margin)


def tune_features(
    frames: Sequence[Prepared] | Sequence[Sequence[Prepared]],
    reference_values: Sequence[Any],
    agreement: Callable[[Any, Any], float],
    target: float,
    *,
    features: Sequence[FeatureName] = FEATURES,
    preferred: Optional[FeatureName] = None,
    differencer: Optional[Differencer] = None,
    segments: bool = False,
    **kwargs: Any,
) -> list[TuneResult]:
    """Tune each feature on the same data (pair features computed once) and return the results
    best first: meeting the target, then most skipped, then the preferred feature. With
    `segments=True`, `frames` and `reference_values` are lists of segments."""
    differencer = differencer or Differencer()
    if not segments:
        frames, reference_values = [frames], [reference_values]   # type: ignore[list-item]
    if any(len(f) and getattr(f[0], "foreground", 0.0) is None for f in frames):
        features = [f for f in features if f != "foreground"]     # not prepared by a SceneTracker
    caches = [PairCache(f, differencer) for f in frames]
    data = list(zip(frames, reference_values))
    results = [tune_segments(data, agreement, target, feature=f, caches=caches, differencer=differencer,
                             **kwargs) for f in features]
    return sorted(results, key=lambda r: (not r.met_target, -r.skip_fraction, r.feature != preferred))
