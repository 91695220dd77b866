"""Difference features between a frame and a reference: pixel, area and edge change on a small
blurred grayscale copy, with global brightness shifts removed."""
from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import cv2
import numpy as np

FeatureName = Literal["pixel", "area", "edge", "foreground"]
FEATURES: tuple[FeatureName, ...] = ("pixel", "area", "edge", "foreground")

# Reducto: detection (boxes) -> edge; counting and tagging/presence -> area. For counts and
# presence the change in foreground share predicted count changes better on the tune/ clips
# (it ignores objects that only move along), so it breaks ties there.
_TASK_FEATURE: dict[str, FeatureName] = {
    "detect": "edge", "count": "foreground", "presence": "foreground", "classify": "area", "passthrough": "area",
}


def default_feature(task_type: str) -> FeatureName:
    return _TASK_FEATURE.get(task_type, "area")


class Prepared:
    """A frame reduced for differencing: blurred small grayscale and its mean; the edge map is
    computed on first use. Comparisons against a reference are memoised on the frame, so queries
    on one camera that share a reference (e.g. all inferred on the same frame) pay once."""

    __slots__ = ("gray", "mean", "foreground", "_edge_fn", "_edges", "_memo", "__weakref__")

    def __init__(self, gray: np.ndarray, edge_fn: Callable[[np.ndarray], np.ndarray]) -> None:
        self.gray = gray                              # uint8, h x width
        self.mean = float(cv2.mean(gray)[0])          # for brightness compensation
        self.foreground: Optional[float] = None       # share differing from the camera's background (SceneTracker)
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
    foreground: Optional[float] = None   # change in the share of pixels off the background

    def get(self, name: FeatureName) -> float:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"feature {name!r} needs frames prepared by a SceneTracker")
        return float(value)


@functools.lru_cache(maxsize=16)
def _nearest_rows(height: int, out_h: int) -> np.ndarray:
    """The source rows cv2.resize(INTER_NEAREST) samples: floor(y * height / out_h)."""
    rows = (np.arange(out_h) * (height / out_h)).astype(np.intp)
    rows.setflags(write=False)
    return rows


def _nearest(image: np.ndarray, out_w: int, out_h: int) -> np.ndarray:
    """Equal to cv2.resize(image, (out_w, out_h), interpolation=cv2.INTER_NEAREST)."""
    rows = image.take(_nearest_rows(image.shape[0], out_h), axis=0)
    return cv2.resize(rows, (out_w, out_h), interpolation=cv2.INTER_NEAREST)


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
        # Point-sample straight to the target size (INTER_AREA over the full BGR frame costs
        # ~0.5 ms, more than a 720p H.264 decode's 5%); the blur then averages the samples.
        # The sampled rows are copied out first (whole rows, a memcpy each) and the columns
        # picked from that small block: the same pixels cv2.resize(INTER_NEAREST) picks, in
        # ~35 us instead of ~60 us on a 720p frame fresh from the decoder, where the strided
        # gather over the big frame is what costs.
        small = _nearest(image, out_w, out_h) if out_w != w else image
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
        return self.change_mask(ref.gray, ref.mean, cur.gray, cur.mean)

    def change_mask(self, ref_gray: np.ndarray, ref_mean: float, cur_gray: np.ndarray, cur_mean: float) -> np.ndarray:
        """255 where `cur_gray` differs from `ref_gray` by more than the pixel threshold, after
        removing the global brightness shift between them."""
        shift = round(cur_mean - ref_mean) if self.compensate_brightness else 0
        if shift > 0:
            ref_gray = cv2.add(ref_gray, shift)
        elif shift < 0:
            ref_gray = cv2.subtract(ref_gray, -shift)
        _, mask = cv2.threshold(cv2.absdiff(ref_gray, cur_gray), self.pixel_threshold, 255, cv2.THRESH_BINARY)
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

    def foreground(self, ref: Prepared, cur: Prepared) -> float:
        if ref.foreground is None or cur.foreground is None:
            raise ValueError("feature 'foreground' needs frames prepared by a SceneTracker")
        return abs(cur.foreground - ref.foreground)

    def feature(self, ref: Prepared, cur: Prepared, name: FeatureName) -> float:
        if name == "foreground":
            return self.foreground(ref, cur)   # two floats: nothing to memoise
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
        fg = None if ref.foreground is None or cur.foreground is None else abs(cur.foreground - ref.foreground)
        return FeatureVector(pixel=cv2.countNonZero(mask) / mask.size,
                             area=self.area(ref, cur, mask), edge=self.edge(ref, cur), foreground=fg)


class SceneTracker:
    """One camera's background, so each prepared frame also says how much of it differs from the
    background: the `foreground` share (Frigate's motion model: a running average, updated with
    every frame, brightness shifts removed).

    Its change since the query's last inferred frame is what predicts a count changing: an
    object entering or leaving changes how much of the picture is not background, while a car
    driving along the road, which changes many pixels, does not. Frames must be prepared in order.
    """

    # Background update rate per frame: a change that stays ~20 frames becomes background
    # (Frigate uses 0.01 once calibrated; 0.05 chosen on ../shared/videos/tune).
    ALPHA = 0.05

    def __init__(self, differencer: Differencer) -> None:
        self.differencer = differencer
        self._background: Optional[np.ndarray] = None

    def prepare(self, image: np.ndarray) -> Prepared:
        prepared = self.differencer.prepare(image)
        gray = prepared.gray
        if self._background is None or self._background.shape != gray.shape:
            self._background = gray.astype(np.float32)
        background = cv2.convertScaleAbs(self._background)
        mask = self.differencer.change_mask(background, float(cv2.mean(background)[0]), gray, prepared.mean)
        cv2.accumulateWeighted(gray, self._background, self.ALPHA)
        prepared.foreground = cv2.countNonZero(mask) / mask.size
        return prepared


