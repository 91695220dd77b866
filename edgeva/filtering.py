"""Per-query frame-difference filtering: cheap features, keep/skip decisions, audits, tuning.

Flow per camera frame: `Differencer.prepare(image)` once (downscale + gray + blur + edges),
then each query's `QueryFilter.decide(prepared)` compares it with *that query's* last
inferred frame. Skipped frames reuse the last result; a random share of them is audited
(the model runs anyway and its output is compared with the reused one) so the filter's
agreement with every-frame inference is measured online, with a Wilson lower bound.

Decision rule: compare directly with the last inferred frame, not Reducto's cumulative sum of
consecutive diffs. A slow change (drift, a creeping object) still grows the direct diff because
the reference stays put, while per-frame sensor noise does not add up: with a cumulative sum a
static noisy scene triggers after `threshold / noise_floor` frames, which ties the threshold to
the frame rate and noise level. Drift that never crosses the pixel threshold is what the
staleness bound (`max_skip`) is for.

`tune_threshold` replays the filter over a profiling segment with every-frame model results
and picks the largest threshold whose simulated agreement meets the target.
"""
from __future__ import annotations

import math
import random
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional, Sequence

import cv2
import numpy as np

from edgeva.config import FilterConfig

FeatureName = Literal["pixel", "area", "edge"]
FEATURES: tuple[FeatureName, ...] = ("pixel", "area", "edge")
KeepReason = Literal["first", "threshold", "stale", "disabled", "untuned"]
SkipReason = Literal["below_threshold", "audit"]

# Reducto: detection (boxes) -> edge; counting and tagging/presence -> area.
_TASK_FEATURE: dict[str, FeatureName] = {
    "detect": "edge", "count": "area", "presence": "area", "classify": "area", "passthrough": "area",
}


def default_feature(task_type: str) -> FeatureName:
    return _TASK_FEATURE.get(task_type, "area")


# ------------------------------------------------------------------ features

class Prepared:
    """A frame reduced for differencing: blurred small grayscale and its mean; the edge map is
    computed on first use. Comparisons against a reference are memoised on the frame, so queries
    on one camera that share a reference (e.g. all inferred on the same frame) pay once."""

    __slots__ = ("gray", "mean", "_edge_fn", "_edges", "_memo", "__weakref__")

    def __init__(self, gray: np.ndarray, edge_fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.gray = gray                              # uint8, h x width
        self.mean = float(cv2.mean(gray)[0])          # for brightness compensation
        self._edge_fn = edge_fn
        self._edges: Optional[np.ndarray] = None
        # Weak: a frame that becomes a reference must not keep its own references alive, or a
        # long-running camera would hold every frame it ever inferred.
        self._memo: dict[tuple[int, str, Differencer], tuple[weakref.ref[Prepared], float]] = {}

    @property
    def edges(self) -> np.ndarray:
        """uint8 edge map (0 or 255), same shape as `gray`."""
        if self._edges is None:
            self._edges = self._edge_fn(self.gray)
        return self._edges


@dataclass(frozen=True, slots=True)
class FeatureVector:
    pixel: float   # share of pixels whose intensity changed by more than the pixel threshold
    area: float    # largest connected changed region (after dilation) as a share of the frame
    edge: float    # share of pixels whose edge/no-edge state changed

    def get(self, name: FeatureName) -> float:
        return float(getattr(self, name))


@dataclass(frozen=True)
class Differencer:
    """Preprocessing and pairwise features. One per (camera, width); stateless, so shareable."""

    width: int = 160
    pixel_threshold: int = 21          # Reducto's intensity threshold
    blur_kernel: int = 3               # light; with 4 px pixel noise sigma drops to ~1.5
    # "gradient": 3x3 morphological gradient > edge_threshold, ~9 us at 160x90; "canny" (Reducto)
    # costs 50-100 us there on textured scenes, more than all the rest of the filter.
    edge_detector: Literal["gradient", "canny"] = "gradient"
    edge_threshold: int = 40
    canny_low: int = 50
    canny_high: int = 150
    dilate_iterations: int = 1
    compensate_brightness: bool = True  # remove the global intensity shift (auto-exposure, clouds)

    def prepare(self, image: np.ndarray) -> Prepared:
        h, w = image.shape[:2]
        out_w = min(self.width, w)
        out_h = max(1, round(h * out_w / w))
        # Point-sample straight to the target size: reading every 8th row of a 720p frame is
        # what keeps this under ~5% of decoding (INTER_AREA over the full BGR frame costs
        # ~0.5 ms, more than a 720p H.264 decode's 5%). The blur then averages the samples.
        small = cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_NEAREST) if out_w != w else image
        gray = cv2.cvtColor(small, cv2.COLOR_BGR2GRAY) if small.ndim == 3 else small
        if self.blur_kernel > 1:
            gray = cv2.GaussianBlur(gray, (self.blur_kernel, self.blur_kernel), 0)
        return Prepared(np.ascontiguousarray(gray), self._edge_map)

    def _edge_map(self, gray: np.ndarray) -> np.ndarray:
        if self.edge_detector == "canny":
            return cv2.Canny(gray, self.canny_low, self.canny_high)
        grad = cv2.morphologyEx(gray, cv2.MORPH_GRADIENT, None)
        return cv2.threshold(grad, self.edge_threshold, 255, cv2.THRESH_BINARY)[1]

    def _changed(self, ref: Prepared, cur: Prepared) -> np.ndarray:
        if ref.gray.shape != cur.gray.shape:
            raise ValueError(f"frames prepared at different sizes: {ref.gray.shape} vs {cur.gray.shape}")
        ref_gray = ref.gray
        shift = round(cur.mean - ref.mean) if self.compensate_brightness else 0
        if shift > 0:
            ref_gray = cv2.add(ref_gray, shift)
        elif shift < 0:
            ref_gray = cv2.subtract(ref_gray, -shift)
        _, mask = cv2.threshold(cv2.absdiff(ref_gray, cur.gray), self.pixel_threshold, 255,
                                cv2.THRESH_BINARY)
        return mask

    def pixel(self, ref: Prepared, cur: Prepared) -> float:
        mask = self._changed(ref, cur)
        return cv2.countNonZero(mask) / mask.size

    def area(self, ref: Prepared, cur: Prepared, mask: Optional[np.ndarray] = None) -> float:
        mask = self._changed(ref, cur) if mask is None else mask
        if not cv2.countNonZero(mask):
            return 0.0
        if self.dilate_iterations:
            mask = cv2.dilate(mask, None, iterations=self.dilate_iterations)
        # Reducto's measure; findContours is ~3x cheaper than connectedComponentsWithStats here.
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        return max(cv2.contourArea(c) for c in contours) / mask.size

    def edge(self, ref: Prepared, cur: Prepared) -> float:
        if ref.edges.shape != cur.edges.shape:
            raise ValueError(f"frames prepared at different sizes: {ref.edges.shape} vs {cur.edges.shape}")
        return cv2.countNonZero(cv2.bitwise_xor(ref.edges, cur.edges)) / ref.edges.size

    def feature(self, ref: Prepared, cur: Prepared, name: FeatureName) -> float:
        key = (id(ref), name, self)
        hit = cur._memo.get(key)
        if hit is not None and hit[0]() is ref:
            return hit[1]
        if name == "pixel":
            value = self.pixel(ref, cur)
        elif name == "area":
            value = self.area(ref, cur)
        elif name == "edge":
            value = self.edge(ref, cur)
        else:
            raise ValueError(f"unknown feature {name!r}")
        cur._memo[key] = (weakref.ref(ref), value)
        return value

    def features(self, ref: Prepared, cur: Prepared) -> FeatureVector:
        mask = self._changed(ref, cur)
        return FeatureVector(pixel=cv2.countNonZero(mask) / mask.size,
                             area=self.area(ref, cur, mask), edge=self.edge(ref, cur))


# ------------------------------------------------------------------ audit

def wilson_lower_bound(successes: int, n: int, z: float = 1.96) -> float:
    if n <= 0:
        return 0.0
    p = successes / n
    denom = 1.0 + z * z / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / denom)


@dataclass
class AuditTracker:
    """Agreement of reused results with what the model would have said, from random audits.

    The query's accuracy target is a mean agreement, so the decisions use the mean of the last
    `window` audits with a normal-approximation confidence interval: `needs_retune` when even
    its upper end is below the target (confidently too lossy), `can_relax` when its lower end is
    above the target plus a margin. `wilson_low` (share of audits that agreed fully, at
    `agree_level`) is reported for operators.
    """

    window: int = 200
    min_samples: int = 30
    agree_level: float = 0.999
    z: float = 1.96
    relax_margin: float = 0.02
    total: int = 0
    agreement_sum: float = 0.0
    recent: deque = field(default_factory=deque)

    def record(self, agreement: float) -> None:
        self.total += 1
        self.agreement_sum += agreement
        self.recent.append(float(agreement))
        while len(self.recent) > self.window:
            self.recent.popleft()

    def reset_window(self) -> None:
        self.recent.clear()

    @property
    def mean_agreement(self) -> Optional[float]:
        return self.agreement_sum / self.total if self.total else None

    def wilson_low(self) -> Optional[float]:
        if not self.recent:
            return None
        return wilson_lower_bound(sum(v >= self.agree_level for v in self.recent), len(self.recent), self.z)

    def interval(self) -> Optional[tuple[float, float]]:
        """(low, high) of the window's mean agreement; None below min_samples."""
        n = len(self.recent)
        if n < self.min_samples:
            return None
        mean = sum(self.recent) / n
        var = sum((v - mean) ** 2 for v in self.recent) / max(1, n - 1)
        half = self.z * math.sqrt(var / n)
        return mean - half, mean + half

    def needs_retune(self, target: float) -> bool:
        bounds = self.interval()
        return bounds is not None and bounds[1] < target

    def can_relax(self, target: float) -> bool:
        bounds = self.interval()
        return bounds is not None and bounds[0] >= min(1.0, target + self.relax_margin)


# ------------------------------------------------------------------ per-query filter

@dataclass(frozen=True, slots=True)
class Decision:
    keep: bool                        # True: run the model on this frame
    reason: str                       # KeepReason when kept, SkipReason when skipped
    value: Optional[float]            # feature vs the last inferred frame (None without one)
    skipped_since_inferred: int       # kept: reuses before this frame; skipped: incl. this one (= age_frames)
    audit: bool = False               # skipped, but run the model anyway and record_audit() the agreement


class QueryFilter:
    """Keep/skip decisions for one query against its own last inferred frame."""

    def __init__(self, cfg: FilterConfig, rng_seed: Optional[int] = None,
                 differencer: Optional[Differencer] = None, audit: Optional[AuditTracker] = None) -> None:
        self.cfg = cfg
        self.feature: FeatureName = cfg.feature
        self.threshold: Optional[float] = cfg.threshold
        self.differencer = differencer or Differencer(width=cfg.width)
        self.audits = audit or AuditTracker()
        self._rng = random.Random(rng_seed)
        self._reference: Optional[Prepared] = None
        self._skipped = 0
        self._kept: dict[str, int] = {}
        self._reused: dict[str, int] = {}
        self._max_age = 0
        self._retunes = 0

    def decide(self, prepared: Prepared) -> Decision:
        if not self.cfg.enabled:
            return self._keep("disabled", None)
        if self._reference is None:
            return self._keep("first", None)
        if self._reference.gray.shape != prepared.gray.shape:
            return self._keep("resized", None)   # the camera came back at another size or aspect
        value = self.differencer.feature(self._reference, prepared, self.feature)
        if self.threshold is None:
            return self._keep("untuned", value)
        if value > self.threshold:
            return self._keep("threshold", value)
        if self._skipped >= self.cfg.max_skip:
            return self._keep("stale", value)
        self._skipped += 1
        self._max_age = max(self._max_age, self._skipped)
        audit = self._rng.random() < self.cfg.audit_fraction
        reason = "audit" if audit else "below_threshold"
        self._reused[reason] = self._reused.get(reason, 0) + 1
        return Decision(False, reason, value, self._skipped, audit)

    def _keep(self, reason: str, value: Optional[float]) -> Decision:
        self._kept[reason] = self._kept.get(reason, 0) + 1
        return Decision(True, reason, value, self._skipped)

    def mark_inferred(self, prepared: Prepared) -> None:
        """Call once the model has produced the result that later skipped frames will reuse."""
        self._reference = prepared
        self._skipped = 0

    def forget_reference(self) -> None:
        """The kept frame never got a result (dropped): the next frame is inferred."""
        self._reference = None
        self._skipped = 0

    def record_audit(self, agreed: float) -> None:
        self.audits.record(agreed)

    def needs_retune(self, target: float) -> bool:
        return self.audits.needs_retune(target)

    def can_relax(self, target: float) -> bool:
        return self.audits.can_relax(target)

    def set_threshold(self, threshold: Optional[float], feature: Optional[FeatureName] = None) -> None:
        """Apply a (re)tuned threshold; audits from the old setting no longer apply."""
        self.threshold = threshold
        if feature is not None:
            self.feature = feature
        self.audits.reset_window()
        self._retunes += 1

    def stats(self) -> dict[str, Any]:
        kept = sum(self._kept.values())
        reused = sum(self._reused.values())
        low = self.audits.wilson_low()
        mean = self.audits.mean_agreement
        return {
            "feature": self.feature,
            "threshold": self.threshold,
            "enabled": self.cfg.enabled,
            "max_skip": self.cfg.max_skip,
            "frames": kept + reused,
            "kept": kept,
            "reused": reused,
            "kept_by_reason": dict(self._kept),
            "reused_by_reason": dict(self._reused),
            "reuse_fraction": reused / (kept + reused) if kept + reused else 0.0,
            "max_age_frames": self._max_age,
            "audited": self.audits.total,
            "audited_agreement": mean,
            "audit_window": len(self.audits.recent),
            "wilson_low": low,
            "retunes": self._retunes,
        }


# ------------------------------------------------------------------ tuning

PairValue = Callable[[int, int], float]


@dataclass(frozen=True, slots=True)
class CurvePoint:
    threshold: float
    skip_fraction: float
    agreement: float              # mean per-frame agreement with the every-frame reference
    worst_window_agreement: float  # lowest mean over consecutive windows (default 30 frames)
    uniform_agreement: float      # every-k sampling inferring as many frames: the baseline to beat


@dataclass(frozen=True)
class TuneResult:
    feature: FeatureName
    threshold: Optional[float]    # None when no candidate met the target: infer every frame
    met_target: bool
    target: float                 # the agreement required, safety margin included
    skip_fraction: float
    agreement: float
    uniform_agreement: float
    curve: tuple[CurvePoint, ...]


def default_candidates() -> tuple[float, ...]:
    """0 plus a geometric grid over the range the three features live in (shares of a frame)."""
    return (0.0,) + tuple(float(x) for x in np.geomspace(1e-4, 0.5, 30))


def simulate_filter(pair_value: PairValue, n_frames: int, threshold: float, max_skip: int) -> list[int]:
    """Replay the keep/skip rule; returns for each frame the index of the inferred frame whose
    result it carries (itself when inferred)."""
    source: list[int] = []
    ref = -1
    skipped = 0
    for i in range(n_frames):
        if ref < 0 or pair_value(ref, i) > threshold or skipped >= max_skip:
            ref, skipped = i, 0
        else:
            skipped += 1
        source.append(ref)
    return source


def uniform_sources(n_frames: int, n_inferred: int) -> list[int]:
    """Every-k sampling with `n_inferred` evenly spaced inferred frames (the first included)."""
    if n_frames == 0:
        return []
    picks = np.unique(np.floor(np.linspace(0, n_frames, max(1, n_inferred), endpoint=False)).astype(int))
    return [int(picks[np.searchsorted(picks, i, side="right") - 1]) for i in range(n_frames)]


class _PairCache:
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


def tune_threshold(
    frames: Sequence[Prepared] | PairValue,
    reference_values: Sequence[Any],
    agreement: Callable[[Any, Any], float],
    target: float,
    *,
    feature: FeatureName = "area",
    max_skip: int = 30,
    candidates: Optional[Sequence[float]] = None,
    safety_margin: float = 0.0,
    window: int = 30,
    differencer: Optional[Differencer] = None,
    _cache: Optional[_PairCache] = None,
) -> TuneResult:
    """Pick the threshold for `feature` that skips the most while keeping agreement.

    `frames` is the profiling segment (prepared frames) or a callable giving the feature between
    frame i (reference) and frame j. `reference_values[i]` is the model's output on frame i.
    Every candidate is simulated with the real rule (reference = last inferred frame, staleness
    bound); a skipped frame scores agreement(reference_values[i], reference_values[source]).

    The chosen threshold is the largest candidate such that it *and every smaller candidate*
    reach `target + safety_margin`: an isolated lucky point above a failing one is not trusted,
    and a stricter target can never give a larger threshold. If not even the smallest candidate
    does, the result says threshold None (infer every frame) and met_target False; note that
    threshold 0 still skips frames in which no pixel changed beyond the intensity threshold.
    """
    n = len(reference_values)
    if callable(frames):
        pair_value = frames
    else:
        if len(frames) != n:
            raise ValueError(f"{len(frames)} frames but {n} reference values")
        cache = _cache or _PairCache(frames, differencer or Differencer())
        pair_value = cache.value_fn(feature)
    required = target + safety_margin
    grid = sorted(set(float(c) for c in (candidates if candidates is not None else default_candidates())))
    memo_agree: dict[tuple[int, int], float] = {}

    def score(source: list[int]) -> np.ndarray:
        out = np.ones(len(source))
        for i, src in enumerate(source):
            if i != src:
                key = (i, src)
                if key not in memo_agree:
                    memo_agree[key] = float(agreement(reference_values[i], reference_values[src]))
                out[i] = memo_agree[key]
        return out

    def worst_window(scores: np.ndarray) -> float:
        if not len(scores):
            return 1.0
        return float(min(scores[k:k + window].mean() for k in range(0, len(scores), window)))

    curve: list[CurvePoint] = []
    for thr in grid:
        source = simulate_filter(pair_value, n, thr, max_skip)
        scores = score(source)
        inferred = sum(1 for i, s in enumerate(source) if i == s)
        uniform = score(uniform_sources(n, inferred))
        curve.append(CurvePoint(thr, 1.0 - inferred / n if n else 0.0,
                                float(scores.mean()) if n else 1.0, worst_window(scores),
                                float(uniform.mean()) if n else 1.0))

    chosen: Optional[CurvePoint] = None
    for point in curve:
        if point.agreement < required:
            break
        chosen = point
    if chosen is None:
        return TuneResult(feature, None, False, required, 0.0, 1.0, 1.0, tuple(curve))
    return TuneResult(feature, chosen.threshold, True, required, chosen.skip_fraction,
                      chosen.agreement, chosen.uniform_agreement, tuple(curve))


def tune_features(
    frames: Sequence[Prepared],
    reference_values: Sequence[Any],
    agreement: Callable[[Any, Any], float],
    target: float,
    *,
    features: Sequence[FeatureName] = FEATURES,
    preferred: Optional[FeatureName] = None,
    differencer: Optional[Differencer] = None,
    **kwargs: Any,
) -> list[TuneResult]:
    """Tune each feature on the same segment (pair features computed once) and return the
    results best first: meeting the target, then most skipped, then the preferred feature."""
    cache = _PairCache(frames, differencer or Differencer())
    results = [tune_threshold(frames, reference_values, agreement, target, feature=f,
                              _cache=cache, **kwargs) for f in features]
    return sorted(results, key=lambda r: (not r.met_target, -r.skip_fraction, r.feature != preferred))
