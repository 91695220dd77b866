"""Calibration windows and their tuning: what a dense window holds while its results come back,
and the snapshot of it (pooled with similar profiled windows) that the tuner runs on any thread.

edgeva.filtering.policy opens the windows, feeds them frames and results, and applies what their
tuning learned.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from edgeva.config import FilterConfig

from .features import FEATURES, Differencer, FeatureName, Prepared
from .profiles import Setting
from .tuner import age_candidates, tune_features

log = logging.getLogger("edgeva.filtering")


class Window:
    """A densely inferred stretch: its frames in order and the model's result on each."""

    def __init__(self, frames_wanted: int, confirms: Optional[Setting] = None) -> None:
        self.frames_wanted = frames_wanted
        self.frames: list[Prepared] = []
        self.values: dict[int, Any] = {}      # id(prepared) -> result
        self.lost: set[int] = set()            # id(prepared) of frames that will never get one (dropped)
        self.waited = 0                        # frames seen since it filled, waiting for results
        self.confirms = confirms               # the setting in force, which its first half may confirm
        self.confirm_started = False

    def holds(self, prepared: Prepared) -> bool:
        return any(f is prepared for f in self.frames)

    @property
    def half(self) -> int:
        return self.frames_wanted // 2

    def _answered(self, frames: list) -> bool:
        return all(id(f) in self.values or id(f) in self.lost for f in frames)

    def half_complete(self) -> bool:
        return len(self.frames) >= self.half and self._answered(self.frames[:self.half])

    @property
    def full(self) -> bool:
        return len(self.frames) >= self.frames_wanted

    def complete(self) -> bool:
        return self.full and self._answered(self.frames)

    def awaits_results(self) -> bool:
        """Its next step (tuning the whole window, or checking its first half) waits for results."""
        if self.full:
            return not self.complete()
        return self.confirms is not None and not self.confirm_started and len(self.frames) >= self.half


@dataclass(frozen=True)
class Tuned:
    """What tuning one window learned: its key and setting, to be stored as a profile."""

    key: Any
    setting: Setting
    pieces: list
    agreement: float
    frames: list
    values: list
    informed: bool = True     # the answer changed within the window (edgeva.filtering.profiles)


@dataclass
class TuningJob:
    """Everything tuning one window needs, snapshotted: runs on any thread, touches no filter state."""

    segments: list
    values: list
    agreement: Callable[[Any, Any], float]
    target: float
    differencer: Differencer
    features: tuple
    preferred: Optional[str]
    longest: int
    key: Any
    pieces: list

    def run(self) -> Tuned:
        try:
            return self._tune()
        except Exception:   # a bug in tuning must not leave the query calibrating for ever
            log.exception("filter tuning failed; inferring every frame until the next profile")
            return Tuned(self.key, Setting(0.0, 0, "pixel"), self.pieces, 1.0, self.segments[0], self.values[0],
                         self._informed())

    def _tune(self) -> Tuned:
        result = tune_features(self.segments, self.values, self.agreement, self.target, features=self.features,
                               preferred=self.preferred, differencer=self.differencer, safety_margin="auto",
                               segments=True, max_ages=age_candidates(self.longest))[0]
        setting = (Setting(result.threshold, result.max_age, result.feature) if result.met_target
                   else Setting(0.0, 0, result.feature))
        return Tuned(self.key, setting, self.pieces, result.agreement, self.segments[0], self.values[0],
                     self._informed())

    def _informed(self) -> bool:
        values = self.values[0]
        return any(self.agreement(v, values[0]) < 1.0 for v in values[1:])


def run_inline(job: Callable[[], None]) -> None:
    """Run a tuning job at once, on the caller's thread (batch replay, tests)."""
    job()


def longest_age(cfg: FilterConfig, fps: float) -> int:
    """The longest staleness bound (frames at `fps`) the tuner may choose under this config:
    `tuned_max_age_limit_s`, and `max_age_s` and `max_skip` when set. Shared by the daemon's
    calibration and `edgeva tune`, so both choose among the same settings."""
    def frames(seconds: float) -> int:
        return max(0, int(round(seconds * fps)))

    longest = frames(cfg.tuned_max_age_limit_s)
    if cfg.max_age_s is not None:
        longest = min(longest, frames(cfg.max_age_s))
    if cfg.max_skip is not None:
        longest = min(longest, cfg.max_skip)
    return longest


def tunable_features(cfg: FilterConfig, frames: Sequence[Prepared]) -> tuple[FeatureName, ...]:
    """The features the tuner tries: the configured one, or all with `auto`; `foreground` only
    on frames a SceneTracker prepared."""
    features = FEATURES if cfg.feature == "auto" else (cfg.feature,)
    return tuple(f for f in features if f != "foreground" or (frames and frames[0].foreground is not None))
