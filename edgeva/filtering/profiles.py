"""What a query's filter learned about its camera: profiled segments and the setting that met
the target on each (Reducto's hash table, learned online).

A segment's key is a histogram of its consecutive-frame difference values (how much the scene
moves, and how often); its label is the setting the tuner chose on it. A new segment gets the
label of the profiled segments whose keys are nearest (distance-weighted), and the lookup says
whether it is farther from every profile than that profile's own pieces were from it and whether
the picture moves more than in the nearest; from those the filter decides whether the segment is
new, and then profiles it (a calibration window, tuned on) and adds it.

A profile whose window's answer never changed, or changed so little that the laxest setting (no
threshold, the longest bound) kept the target there, is *uninformed*: every threshold kept the
target there, so it cannot say which threshold is safe, only that nothing happened (its tuning
takes the largest change the window showed, 0 for a frozen picture: any change then triggers),
and the filter profiles the first change it sees (edgeva.filtering.policy). Once some
profile saw the answer change, the settings are voted among those informed profiles; the
uninformed ones still count for whether a segment is new.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from edgeva.config import SEGMENT_KEY_BINS

from .features import Differencer, Prepared

KEY_BINS = SEGMENT_KEY_BINS
SEGMENT_FEATURE = "pixel"   # segment keys: how much of the picture changes from frame to frame
_EDGES = np.concatenate([[0.0], np.geomspace(1e-4, 1.0, KEY_BINS - 1), [np.inf]])


def segment_key(values: Sequence[float]) -> np.ndarray:
    """Normalised 30-bin histogram (0, then log-spaced shares of a frame) of per-frame differences."""
    hist, _ = np.histogram(np.asarray(values, dtype=np.float64), bins=_EDGES)
    total = hist.sum()
    return hist / total if total else hist.astype(np.float64)


def window_key(differencer: Differencer, frames: Sequence[Prepared], piece: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """A profiled window's key and the keys of its pieces of `piece` frame-to-frame changes (the
    same for a calibration window in the daemon and a segment `edgeva tune` profiles)."""
    changes = [differencer.feature(a, b, SEGMENT_FEATURE) for a, b in zip(frames, frames[1:])]
    return segment_key(changes), segment_pieces(changes, piece)


def segment_pieces(values: Sequence[float], piece: int) -> list[np.ndarray]:
    """Keys of a window's consecutive pieces of `piece` frame-to-frame changes (the last one kept
    when it is at least half a piece): how much the window varies within itself."""
    return [segment_key(values[k:k + piece]) for k in range(0, len(values), piece)
            if len(values[k:k + piece]) >= piece // 2]


# Keys closer than this are the same activity level: every difference within a factor of ~2
# (two log-spaced bins, each a factor of 10**(4/28) = 1.39). Without a floor, a perfectly still
# profiled segment (all mass in one bin, radius 0) would make every later segment "new".
SAME_LEVEL = 2.0 / KEY_BINS


def activity(key: np.ndarray) -> float:
    """Mean bin position of a key: higher is busier."""
    return float((key * np.arange(len(key))).sum() / KEY_BINS)


def key_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Earth mover's distance between two keys over bin positions (0..1): shifting all mass by
    one bin costs 1/30, so nearby activity levels are near, unlike a bin-wise L1."""
    return float(np.abs(np.cumsum(a - b)).sum() / KEY_BINS)


@dataclass(frozen=True)
class Setting:
    threshold: float      # math.inf: only the staleness bound
    max_age: int          # frames a result may be reused
    feature: str = "area"  # the change feature the threshold applies to


@dataclass
class Profile:
    key: np.ndarray
    setting: Setting
    radius: float         # how far the profiled segment's own pieces were from its key
    agreement: float      # what the setting reached on it
    frames: Optional[list] = None    # the profiled window itself (prepared frames), while kept
    values: Optional[list] = None    # the model's result on each of them
    informed: bool = True            # the window could tell settings apart (see above)


@dataclass(frozen=True)
class Lookup:
    setting: Setting
    distance: float       # to the nearest profile
    far: bool             # farther from every profile than that profile's own pieces were
    busier: bool          # the picture moves more than in the nearest profile


class ProfileTable:
    """Bounded set of profiles. When full, the new profile supersedes the one most like it (the
    same activity level, tuned longer ago), not the oldest: a daemon re-profiles its camera every
    few minutes, and evicting by age would forget the night's or the rain's profiles within a few
    hours of daytime bursts, then pay to learn them again."""

    def __init__(self, capacity: int = 32, neighbours: int = 5, windows_kept: int = 8) -> None:
        self.capacity = capacity
        self.neighbours = neighbours
        self.windows_kept = windows_kept     # profiles that keep their frames for pooled tuning
        self.profiles: list[Profile] = []

    def __len__(self) -> int:
        return len(self.profiles)

    @property
    def informed(self) -> bool:
        """Whether some profiled window could tell settings apart (its answer changed enough)."""
        return any(p.informed for p in self.profiles)

    def add(self, key: np.ndarray, setting: Setting, pieces: Sequence[np.ndarray], agreement: float,
            frames: Optional[list] = None, values: Optional[list] = None, informed: bool = True) -> Profile:
        return self._insert(Profile(key, setting, profile_radius(key, pieces), agreement, frames, values, informed))

    def seed(self, key: np.ndarray, setting: Setting, radius: float, informed: bool) -> Profile:
        """A profile tuned before the query started (`edgeva tune --write`): no frames to pool."""
        return self._insert(Profile(key, setting, max(SAME_LEVEL, radius), math.nan, None, None, informed))

    def _insert(self, profile: Profile) -> Profile:
        key = profile.key
        if len(self.profiles) >= self.capacity:
            del self.profiles[min(range(len(self.profiles)), key=lambda i: key_distance(key, self.profiles[i].key))]
        self.profiles.append(profile)
        for old in self.profiles[:-self.windows_kept]:
            old.frames = old.values = None
        return profile

    def nearest_windows(self, key: np.ndarray, count: int) -> list[Profile]:
        """The `count` profiles nearest to `key` that still keep their frames."""
        kept = [p for p in self.profiles if p.frames is not None]
        return sorted(kept, key=lambda p: key_distance(key, p.key))[:count]

    def lookup(self, key: np.ndarray) -> Optional[Lookup]:
        if not self.profiles:
            return None
        ranked = sorted(((key_distance(key, p.key), p) for p in self.profiles), key=lambda t: t[0])
        nearest_d, nearest = ranked[0]
        informed = [(d, p) for d, p in ranked if p.informed]
        near = (informed or ranked)[:self.neighbours]
        # Distance-weighted vote over the neighbours' settings; ties go to the one inferring more.
        votes: dict[Setting, float] = {}
        for d, p in near:
            votes[p.setting] = votes.get(p.setting, 0.0) + 1.0 / max(d, 1e-6)
        best = max(votes.items(), key=lambda kv: (kv[1], -kv[0].max_age, -_finite(kv[0].threshold)))[0]
        far = all(d > p.radius for d, p in ranked)
        return Lookup(best, nearest_d, far, activity(key) > activity(nearest.key))


def profile_radius(key: np.ndarray, pieces: Sequence[np.ndarray]) -> float:
    """How far a profiled window's pieces were from its key (at least SAME_LEVEL): a later segment
    farther than this from every profile is new."""
    return max(SAME_LEVEL, max((key_distance(key, p) for p in pieces), default=0.0))


def tighten(setting: Setting, factor: float) -> Setting:
    threshold = setting.threshold * factor if math.isfinite(setting.threshold) else setting.threshold
    return Setting(threshold, max(0, int(setting.max_age * factor)), setting.feature)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else 1e9
