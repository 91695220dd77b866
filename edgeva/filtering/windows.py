"""Calibration windows and their tuning: what a window holds while its results come back (which
frames it inferred, and the answers it carried over the others), and the snapshot of it (pooled
with similar profiled windows) that the tuner runs on any thread; and the quiet run, a stretch
the setting in force inferred as densely as a window while the answer held, tuned like one.

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
from .tuner import Carried, age_candidates, tells_settings_apart, tune_features

log = logging.getLogger("edgeva.filtering")


class Window:
    """A calibration stretch: its frames in order and the model's result on the frames it inferred.

    The window infers sparsely where the answer holds still: after a frame whose answer equals the
    one inferred before it the stride doubles (up to `max_stride`), after a changed answer it is
    one again, so where the answer changes every frame is inferred. A skipped frame carries the
    answer inferred before it (`Carried`); the tuner replays with it but scores agreement only on
    the inferred frames, since a flicker inside the stride would have gone unseen.

    The window's own frames count towards the query's agreement too. A change found after a
    stride of s frames was missed, on average, on half of the s - 1 frames skipped before it; the
    stride grows only while the window's agreement, with that estimated loss, is at the target.
    """

    def __init__(self, frames_wanted: int, confirms: Optional[Setting] = None, max_stride: int = 1,
                 target: float = 0.0) -> None:
        self.frames_wanted = frames_wanted
        self.frames: list[Prepared] = []
        self.values: dict[int, Any] = {}      # id(prepared) -> result, for the frames it inferred
        self.skipped: set[int] = set()         # id(prepared) of frames it did not infer
        self.lost: set[int] = set()            # id(prepared) of frames that will never get one (dropped)
        self.waited = 0                        # frames seen since it filled, waiting for results
        self.confirms = confirms               # the setting in force, which its first half may confirm
        self.confirm_started = False
        self.max_stride = max(1, max_stride)
        self.stride = 1                        # infer every stride-th frame while the answer holds
        self._since_kept = 0                   # frames skipped since the last one it inferred
        self._last_kept: Optional[Prepared] = None
        self._kept_before: dict[int, Prepared] = {}   # id(kept frame) -> the frame it inferred before it
        self._position: dict[int, int] = {}            # id(frame) -> its index in the window
        self.target = target
        self.carried_loss = 0.0                # estimated agreement lost on the frames it skipped

    def holds(self, prepared: Prepared) -> bool:
        index = self._position.get(id(prepared))
        return index is not None and self.frames[index] is prepared

    @property
    def half(self) -> int:
        return self.frames_wanted // 2

    def _answered(self, frames: list) -> bool:
        return all(id(f) in self.values or id(f) in self.lost or id(f) in self.skipped for f in frames)

    def half_complete(self) -> bool:
        return len(self.frames) >= self.half and self._answered(self.frames[:self.half])

    @property
    def full(self) -> bool:
        return len(self.frames) >= self.frames_wanted

    def complete(self) -> bool:
        return self.full and self._answered(self.frames)

    def awaits_results(self) -> bool:
        """Its next step (tuning the whole window, checking its first half, or choosing its
        stride from the last inferred frame's answer) waits for results."""
        if self.full:
            return not self.complete()
        if self.max_stride > 1 and self._last_kept is not None and not self._answered([self._last_kept]):
            return True
        return self.confirms is not None and not self.confirm_started and len(self.frames) >= self.half

    def wants(self) -> bool:
        """Whether the next frame is inferred: the first, and then one every `stride` frames."""
        return self._last_kept is None or self._since_kept + 1 >= self.stride

    def add(self, prepared: Prepared, inferred: bool) -> None:
        self._position[id(prepared)] = len(self.frames)
        self.frames.append(prepared)
        if not inferred:
            self.skipped.add(id(prepared))
            self._since_kept += 1
            return
        if self._last_kept is not None:
            self._kept_before[id(prepared)] = self._last_kept
        self._last_kept = prepared
        self._since_kept = 0

    def record(self, prepared: Prepared, value: Any, agreement: Optional[Callable[[Any, Any], float]]) -> None:
        """The result of one of its frames; the stride follows whether the answer moved since the
        frame inferred before it. On a live camera the answer comes a frame or more after the next
        frame was decided; it still sets the stride for the frames decided from then on."""
        self.values[id(prepared)] = value
        before = self._kept_before.get(id(prepared))
        if agreement is None or before is None or id(before) not in self.values:
            return
        agreed = agreement(value, self.values[id(before)])
        if agreed < 1.0:
            # the answer changed somewhere among the frames skipped since `before`: half of them,
            # on average, carried the old answer
            skipped = self._position[id(prepared)] - self._position[id(before)] - 1
            self.carried_loss += skipped * (1.0 - agreed) / 2.0
        held = agreed >= 1.0 and self.estimated_agreement() >= self.target
        self.stride = min(self.max_stride, self.stride * 2) if held else 1

    def estimated_agreement(self) -> float:
        """The window's own agreement so far, counting the estimated loss on the frames it skipped."""
        return 1.0 - self.carried_loss / len(self.frames) if self.frames else 1.0

    def answered(self, frames: Optional[list] = None) -> tuple[list, list]:
        """The frames with an answer (`frames`, default all) and those answers: an inferred
        frame's result, a skipped frame the answer inferred before it (`Carried`: the tuner does
        not score it); lost frames left out."""
        out_frames, out_values = [], []
        last: Any = None
        have = False
        for f in self.frames if frames is None else frames:
            if id(f) in self.values:
                last, have = self.values[id(f)], True
                out_values.append(last)
            elif id(f) in self.skipped and have:
                out_values.append(Carried(last))
            else:
                continue
            out_frames.append(f)
        return out_frames, out_values


class QuietRun:
    """Frames the setting in force decided while the answer held: kept at most `max_stride` apart
    (as a calibration window keeps them where its answer holds), every kept frame's result the
    same answer. Once it spans a window's length with every result in, it *is* such a window,
    inferred by the setting itself at no extra cost, and tuned like one. It breaks when a kept
    frame's answer differs from the first, when more than `max_stride - 1` frames in a row were
    skipped, or when a kept frame's result is lost."""

    def __init__(self, frames_wanted: int, max_stride: int, start: int = 0) -> None:
        self.window = Window(frames_wanted)
        self.max_stride = max(1, max_stride)
        self.start = start                  # the query's decision count at its first frame
        self._skipped_in_a_row = 0

    def add(self, prepared: Prepared, kept: bool) -> bool:
        """The next decided frame; False when the run cannot go on (a gap longer than a stride)."""
        if self.window.full:
            return True
        if not self.window.frames and not kept:
            return True                     # a run starts at a kept frame
        self._skipped_in_a_row = 0 if kept else self._skipped_in_a_row + 1
        if self._skipped_in_a_row >= self.max_stride:
            return False
        self.window.add(prepared, inferred=kept)
        return True

    def record(self, prepared: Prepared, value: Any, agreement: Callable[[Any, Any], float]) -> bool:
        """A kept frame's result; False when the answer moved (the run is over)."""
        if not self.window.holds(prepared):
            return True
        first = next(iter(self.window.values.values()), value)
        if agreement(value, first) < 1.0:
            return False
        self.window.record(prepared, value, None)
        return True

    def holds(self, prepared: Prepared) -> bool:
        return self.window.holds(prepared)

    @property
    def length(self) -> int:
        return len(self.window.frames)

    @property
    def kept(self) -> int:
        return len(self.window.frames) - len(self.window.skipped)

    def complete(self) -> bool:
        return self.window.complete()


@dataclass(frozen=True)
class Tuned:
    """What tuning one window learned: its key and setting, to be stored as a profile."""

    key: Any
    setting: Setting
    pieces: list
    agreement: float
    frames: list
    values: list
    informed: bool = True     # the window can tell settings apart (edgeva.filtering.profiles)


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
    look_ahead: bool = False          # the query bisects disagreeing gaps (tuner.bisect_sources)

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
                               segments=True, max_ages=age_candidates(self.longest),
                               look_ahead=self.look_ahead)[0]
        setting = (Setting(result.threshold, result.max_age, result.feature) if result.met_target
                   else Setting(0.0, 0, result.feature))
        return Tuned(self.key, setting, self.pieces, result.agreement, self.segments[0], self.values[0],
                     self._informed())

    def _informed(self) -> bool:
        return tells_settings_apart(self.values[0], self.agreement, self.longest, self.target)


def run_inline(job: Callable[[], None]) -> None:
    """Run a tuning job at once, on the caller's thread (batch replay, tests)."""
    job()


def frames_for(seconds: float, fps: float) -> int:
    """A span configured in seconds (a window, a segment), in frames at `fps`: at least 2."""
    return max(2, int(round(seconds * fps)))


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
