"""One query's keep/skip decisions, and how it learns them from its own camera.

Per frame: compare with the query's last inferred frame (the change feature) and infer when the
change exceeds the current threshold or the reused result reaches the staleness bound.

Where the setting comes from (no hand knobs):
- A query without a configured threshold first *calibrates* for `calibration_s`: its first window
  infers every frame; later windows infer the frames where the answer changes and every
  `calibration_stride`-th frame at most where it holds (edgeva.filtering.windows.Window). Each
  window is tuned (threshold, staleness bound) with the model's own results
  (edgeva.filtering.tuner) and stored as a profile. A query started from `edgeva tune`'s setting
  (`filter.tuned`) opens no first window: the tuned segment is its first profile, and it learns
  on from there like the others.
- Every `segment_s` the recent segment's key (its histogram of consecutive-frame differences) is
  looked up among the profiles; the nearest profiles' setting applies to what follows, so busy
  stretches infer more and quiet ones less. A segment farther from every profile than the
  profiles' own pieces were is new: it is profiled the same way (a burst: a calibration window) and added.
- A burst also comes every `recalibrate_s`, and at once when the audits say the target is
  at risk; until that burst is tuned, every setting is tightened (and relaxed again, never past
  the learned setting, when the audits show headroom).
- While every window so far was uninformed (the answer never changed there), the first change
  a kept frame or an audit sees opens a window at once, inferring every frame
  (`_answer_seen_changing`).
- A setting that keeps frames as densely as a calibration window while the answer holds for a
  window's length (learned where a detector flickered, or from a frozen picture) has paid for an
  uninformed window there: that stretch is tuned alone and its setting holds, its bound growing
  with how long the answer has held (QUIET_EVENTS), until the answer is seen to move; then the
  setting it replaced is back (`_finish_quiet`).
- A new-segment or periodic burst is tuned once at its half as well: when that half (pooled as
  usual) chooses the feature and threshold already in force, the burst has confirmed the setting
  and stops there, its half stored as the profile; the second half would cost inferences to
  learn nothing new.

A changed answer is confirmed: when a kept frame's result differs from the result it replaces,
the next frame is inferred too, and again while the answer keeps changing, at most
CONFIRMATIONS frames in a row. Detectors flicker (a one-frame false positive, a car missed for a
frame); a result that changed is the likeliest to be such a flicker, and reusing it for a whole
staleness bound costs every frame of the bound. The tuner does not count on the confirmations
(they come on top of the setting it chooses); replaying them in the tuner too was measured on
../shared/videos/tune and lost (docs/filtering.md).

Decision rule: compare directly with the last inferred frame, not Reducto's cumulative sum of
consecutive diffs. A slow change (drift, a creeping object) still grows the direct diff because
the reference stays put, while per-frame sensor noise does not add up.

One module (over 400 lines) because the decisions, the windows they open, the results that close
them and the checks at the bound all read and change one query's filter state under its lock.
What a window holds and how it is tuned is edgeva.filtering.windows.
"""
from __future__ import annotations

import logging
import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np

from edgeva.config import FilterConfig

from .audits import AuditTracker, audit_fraction_for_power
from .features import Differencer, FeatureName, Prepared
from .profiles import SEGMENT_FEATURE, Lookup, ProfileTable, Setting, segment_key, tighten, window_key
from .tuner import CONFIRMATIONS, inferred_value
from .windows import QuietRun, Tuned, TuningJob, Window, frames_for, longest_age, run_inline, tunable_features

log = logging.getLogger("edgeva.filtering")

KeepReason = str    # first, threshold, stale, confirm, shared, disabled, untuned, resized, calibrate
SkipReason = str    # below_threshold, audit, sparse (a calibration window's frame between two it infers)

DEFAULT_FPS = 25.0
TIGHTEN = 0.7       # audits say too lossy: thresholds and bounds shrink by this factor
LOWEST_FACTOR = 0.05
# New-segment profiling starts at most once per this many calibration windows, so bursts
# stay under a fifth of the frames however restless the camera.
PROFILING_SPACING = 4
# ... except where the setting's threshold has kept no frame since the last window was tuned (or
# it has none) and the checks at the bound find the answer changing: that setting is already
# losing the answer, so one window's spacing is enough.
FAILING_SPACING = 1
# Checks at the bound in a row that found the answer changed with no threshold keep since the
# check before: the setting responds to nothing the answer does, so the camera is profiled again
# (at FAILING_SPACING), whether or not its segments look new. One such check can be a flicker.
MISSED_IN_A_ROW = 2
POOLED_WINDOWS = 3          # a window is tuned together with its two nearest profiled windows
RESULT_PATIENCE = 4         # a window waits this many window lengths of frames for its results


# A frame kept at the staleness bound is a free check of the reused answer at the bound's age,
# with agreement a between the reused and the new answer: the bound moves by
# BOUND_STEP ** ((a - target) / target). An answer that changed completely (a = 0) halves it, an
# unchanged one (a = 1) grows it back by BOUND_STEP ** ((1 - target) / target), and a count off by
# one of six moves it a little. So it settles where the agreement at the bound's age, the oldest
# any reused answer gets, averages the target (for a presence query: where a share 1 - target of
# the checks find a change), and never past the learned bound (lengthening it was tried on
# ../shared/videos/tune and lost agreement on a motorway).
BOUND_STEP = 2.0

# A quiet run's setting holds a bound of at most 2 (1 - target) / r frames, r the rate at which
# the answer changes: each change a threshold does not see is then carried for half a bound on
# average, a share r * bound / 2 <= 1 - target of the frames. After L frames without a change, r
# is at most QUIET_EVENTS / L with 95 % confidence (no event in L frames: the rule of three).
QUIET_EVENTS = -math.log(0.05)
_REMEMBERED = 16


def _remember(table: dict, prepared: Prepared, entry: Any) -> None:
    """Keep `entry` under id(prepared), the oldest going past _REMEMBERED (results that never came)."""
    table[id(prepared)] = entry
    while len(table) > _REMEMBERED:
        del table[next(iter(table))]


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
                 differencer: Optional[Differencer] = None, audit: Optional[AuditTracker] = None,
                 agreement: Optional[Callable[[Any, Any], float]] = None, target: float = 0.9,
                 fps: Optional[float] = None, preferred_feature: Optional[FeatureName] = None,
                 tune_runner: Callable[[Callable[[], None]], None] = run_inline,
                 dense_first_window: bool = True, look_ahead: bool = False) -> None:
        self.cfg = cfg
        # Looking ahead: the query answers a skipped frame only once the next kept frame's result
        # is in, and bisects a gap whose two ends disagree (edgeva.filtering.tuner.bisect_sources).
        # The tuner then replays the bisection, and a changed answer is not confirmed on the next
        # frame (step 6): its gap is bisected instead. The daemon sets it per config.looks_ahead
        # in batch replay (edgeva.query.ModelQuery holds the gaps, edgeva.gaps plans them).
        self.look_ahead = look_ahead
        self.differencer = differencer or Differencer(width=cfg.width)
        self.audits = audit or AuditTracker()
        self.agreement = agreement
        self.target = target
        self.preferred_feature = preferred_feature    # breaks ties between features (the task's default)
        self.tune_runner = tune_runner
        self._tuned: deque[Tuned] = deque()          # finished tuning jobs, applied at the next decision
        self._confirmations: deque[tuple[Window, Tuned]] = deque()   # half-window tunings, likewise
        self._tuning = 0                              # jobs started and not yet applied
        self.fps = fps or DEFAULT_FPS
        self.profiles = ProfileTable()
        self._rng = random.Random(rng_seed)
        self._learned: Optional[Setting] = None       # from config, or the profiles' lookup
        self._factor = 1.0                            # audits' tightening of the learned setting
        self._bound_factor = 1.0                      # the checks at the bound's shortening of it
        self._stale_kept: dict[int, tuple[Prepared, Prepared]] = {}   # id -> (kept at the bound, its reference)
        self._replaced: dict[int, tuple[Prepared, Prepared]] = {}     # id -> (kept frame, the reference it replaced)
        self._confirm_next = False                    # the last kept frame's answer changed: infer the next one
        self._confirm_run = 0                         # confirmations kept in a row
        self._threshold_kept_since_tuning = False     # the threshold kept a frame since the last tuning
        self._threshold_kept_since_check = False      # ... and since the last check at the bound
        self._missed_in_a_row = 0                     # checks in a row that found a change the threshold missed
        self._results: dict[int, tuple[Prepared, Any]] = {}           # recent kept frames' results
        if cfg.threshold is not None:
            self._learned = Setting(cfg.threshold, self._configured_age(), self._configured_feature())
        self._window: Optional[Window] = None
        if self.learns and cfg.tuned is not None:
            self._seed_tuned()
        if self._learned is None and agreement is not None and cfg.enabled:
            # The first window infers every frame: with nothing learned yet, a sparse stride would
            # step over one-frame detector flicker it cannot know of and learn a setting too lax
            # for it (docs/filtering.md). Later windows are sparse where the answer holds.
            self._window = Window(self._frames_for(cfg.calibration_s),
                                  max_stride=1 if dense_first_window else self._window_stride(), target=target)
        self._reference: Optional[Prepared] = None
        self._previous: Optional[Prepared] = None
        self._segment: list[float] = []
        self._since_profiled = 0
        self._skipped = 0
        self._kept: dict[str, int] = {}
        self._reused: dict[str, int] = {}
        self._max_age_seen = 0
        self._stale_next = False
        self._retunes = 0
        self._profiled = 0
        self._novel = 0
        self._confirmed = 0
        self._first_changes = 0                       # windows opened at a first change (_answer_seen_changing)
        self._first_change: Optional[tuple[Window, Any]] = None   # the latest such window, the answer before it
        self._change_lasted = False                   # ... and whether its answer ended away from that one
        self._quiet: Optional[QuietRun] = None        # frames decided since the answer last moved
        self._quiet_tuned: deque[tuple[Tuned, int]] = deque()   # a finished quiet run's tuning and start, applied at the next decision
        self._held_from: Optional[Setting] = None     # while a quiet run's setting holds: the setting it replaced
        self._decided = 0                             # frames decided so far
        self._quiet_since = 0                         # ... when the held quiet run began
        self._quiet_holds = 0

    # ------------------------------------------------------------- settings
    def set_fps(self, fps: Optional[float]) -> None:
        """The camera's frame rate (known once its source opened): everything configured in
        seconds is re-expressed in frames at this rate."""
        if not fps or fps <= 0 or fps == self.fps:
            return
        self.fps = fps
        if self._learned is not None and not self.profiles and self.cfg.threshold is not None:
            self._learned = Setting(self.cfg.threshold, self._configured_age(), self._learned.feature)
        if self.learns and self.cfg.tuned is not None and not self._profiled and self._window is None:
            self._seed_tuned()
        if self._window is not None and not self._window.full:
            self._window.frames_wanted = self._frames_for(self.cfg.calibration_s)
            self._window.max_stride = min(self._window.max_stride, self._window_stride())

    def _seed_tuned(self) -> None:
        """Start from `edgeva tune`'s setting, its segment the first profile: the query learns on
        from there (new segments, periodic bursts, the first change after an uninformed segment)
        as one without a threshold does after its first window, which the segment stands for."""
        tuned = self.cfg.tuned
        setting = Setting(tuned.threshold, min(self._age_frames(tuned.max_age_s), self._age_cap()), tuned.feature)
        self.profiles = ProfileTable()
        self.profiles.seed(np.asarray(tuned.key, dtype=np.float64), setting, tuned.radius, tuned.informed)
        self._learned = setting

    def _configured_feature(self) -> str:
        """`feature: auto` with a configured threshold: the task's default feature."""
        if self.cfg.feature != "auto":
            return self.cfg.feature
        return self.preferred_feature or "area"

    def _frames_for(self, seconds: float) -> int:
        return frames_for(seconds, self.fps)

    def _age_frames(self, seconds: float) -> int:
        """A staleness bound in frames: 0 s is 0 frames (infer every frame that comes)."""
        return max(0, int(round(seconds * self.fps)))

    def _age_cap(self) -> int:
        cap = self._age_frames(self.cfg.max_age_s) if self.cfg.max_age_s is not None else 10 ** 9
        if self.cfg.max_skip is not None:
            cap = min(cap, self.cfg.max_skip)
        return cap

    def _configured_age(self) -> int:
        if self.cfg.max_age_s is None and self.cfg.max_skip is None:
            return self._age_frames(self.cfg.tuned_max_age_limit_s)
        return self._age_cap()

    @property
    def setting(self) -> Optional[Setting]:
        """What decides now: the learned setting, tightened by the audits, its bound shortened
        when frames kept at the bound found the answer changed."""
        if self._learned is None:
            return None
        setting = tighten(self._learned, self._factor) if self._factor < 1.0 else self._learned
        if self._held_from is not None:
            setting = Setting(setting.threshold, min(setting.max_age, self._quiet_bound()), setting.feature)
        if self._bound_factor < 1.0 and setting.max_age > 0:
            age = max(1, int(round(setting.max_age * self._bound_factor)))
            setting = Setting(setting.threshold, age, setting.feature)
        return setting

    @property
    def feature(self) -> str:
        s = self.setting
        return s.feature if s is not None else self.cfg.feature

    @property
    def threshold(self) -> Optional[float]:
        s = self.setting
        return None if s is None else s.threshold

    @property
    def learns(self) -> bool:
        """A query without a configured threshold learns its setting on the camera (from its first
        window, or from `edgeva tune`'s start); a configured threshold is fixed (only the audits
        tighten and relax it)."""
        return self.cfg.threshold is None and self.agreement is not None

    @property
    def calibrating(self) -> bool:
        return self._window is not None

    def awaiting_results(self) -> bool:
        """The next decision depends on results still in the model: a window's tuning, its half's
        check, the check of a frame kept at the staleness bound, or whether the last kept frame's
        answer changed (a confirmation) waits for them. Batch replay
        waits here, so its decisions are the ones the filter makes when results come at once,
        however far decoding could run ahead."""
        window = self._window
        if window is not None:
            return bool(self._stale_kept) or window.awaits_results()
        return bool(self._stale_kept) or bool(self._replaced)

    # ------------------------------------------------------------- decisions
    def decide(self, prepared: Prepared, audit_draw: Optional[float] = None, model_runs: bool = False) -> Decision:
        """Keep or skip `prepared`. A skipped frame is audited when `audit_draw` (uniform in [0, 1),
        the same for every query of the camera: edgeva.filtering.audits.audit_draw) is below the
        audit share; without one, the filter's own generator draws. `model_runs`: the model runs
        on this frame anyway (another query of the camera keeps or audits it on the same model,
        which runs a frame once however many queries ask): a frame the setting would skip is kept
        ("shared"), a fresher answer at no cost. Calibration windows keep to their own plan."""
        if not self.cfg.enabled:
            return self._keep("disabled", None)
        self._decided += 1
        self._track_segment(prepared)
        if self._reference is None:
            return self._keep("first", None, prepared)
        if self._reference.gray.shape != prepared.gray.shape:
            if self._window is not None:       # a window's frames must share one size
                self._start_window()
            return self._keep("resized", None, prepared)   # the camera came back at another size or aspect
        if self._confirmations:
            self._apply_confirmations()
        if self._tuned:
            self._apply_tuned()
        if self._quiet_tuned:
            self._apply_quiet()
        window = self._window
        if window is not None and window.full:
            # Results lag the decisions by the model's queue (batch replay runs far ahead); only
            # when they are long overdue were some lost (dropped): tune on what came.
            window.waited += 1
            if window.waited > RESULT_PATIENCE * window.frames_wanted:
                self._finish_window()
                window = None
        if window is not None and not window.full:
            if window.wants():
                return self._keep("calibrate", None, prepared)
            return self._skip_in_window(window, prepared)
        # a window that has its frames no longer needs them: while its results are on their way,
        # the setting in force decides (the first window has none yet, so it infers every frame)
        if (window is not None and self._learned is None) or (self._learned is None and self._tuning):
            return self._keep("calibrate", None, prepared)
        setting = self.setting
        if setting is None:
            return self._keep("untuned", None)
        decision = self._decide_by_setting(prepared, setting, audit_draw, model_runs)
        self._track_quiet(prepared, decision.keep)
        return decision

    def _decide_by_setting(self, prepared: Prepared, setting: Setting, audit_draw: Optional[float],
                           model_runs: bool) -> Decision:
        if self._confirm_next:
            self._confirm_next = False
            return self._keep("confirm", None)
        value = self.differencer.feature(self._reference, prepared, setting.feature)
        if math.isfinite(setting.threshold) and value > setting.threshold:
            return self._keep("threshold", value)
        if self._skipped >= setting.max_age:
            self._stale_next = True
            return self._keep("stale", value)
        if model_runs:
            return self._keep("shared", value)
        draw = self._rng.random() if audit_draw is None else audit_draw
        audit = draw < self.audit_fraction()
        return self._reuse("audit" if audit else "below_threshold", value, audit)

    def _reuse(self, reason: str, value: Optional[float], audit: bool = False) -> Decision:
        """Skip the frame: the last inferred result is reused, one frame older."""
        self._skipped += 1
        self._max_age_seen = max(self._max_age_seen, self._skipped)
        self._reused[reason] = self._reused.get(reason, 0) + 1
        return Decision(False, reason, value, self._skipped, audit)

    def _keep(self, reason: str, value: Optional[float], prepared: Optional[Prepared] = None) -> Decision:
        self._kept[reason] = self._kept.get(reason, 0) + 1
        self._confirm_run = self._confirm_run + 1 if reason == "confirm" else 0
        if reason == "threshold":
            self._threshold_kept_since_tuning = self._threshold_kept_since_check = True
        window = self._window
        if window is not None and prepared is not None and not window.full:
            window.add(prepared, inferred=True)
        return Decision(True, reason, value, self._skipped)

    def _skip_in_window(self, window: Window, prepared: Prepared) -> Decision:
        """A window's frame between two it infers: the answer before it is reused (and is what
        the window's tuning sees for it)."""
        window.add(prepared, inferred=False)
        decision = self._reuse("sparse", None)
        self._window_progressed(window)     # its last frame, or its half's, may be this one
        return decision

    def _track_quiet(self, prepared: Prepared, kept: bool) -> None:
        """Follow the quiet run: the setting in force inferring as densely as a calibration window
        while the answer holds (edgeva.filtering.windows.QuietRun)."""
        if not self.learns or self._held_from is not None:
            self._quiet = None
            return
        if self._quiet is None:
            self._quiet = QuietRun(self._frames_for(self.cfg.calibration_s), self._window_stride(), self._decided)
        if not self._quiet.add(prepared, kept):
            self._quiet = None

    def _finish_quiet(self, quiet: QuietRun) -> None:
        """The setting in force inferred a whole window's worth of frames and the answer never
        moved: that is an uninformed calibration window the query already paid for. It is tuned
        alone (pooling it with busier windows would teach it their changes), and its setting (a
        threshold above every change the run showed, a bound that grows with how long the answer
        has held: _quiet_bound) decides until the answer is seen to move; then the setting it
        replaced is back at once. It is not stored as a profile: it says what the answer did
        lately, not what the picture looks like."""
        self._quiet = None
        if quiet.kept * self._quiet_bound(quiet.start) < quiet.length:
            return                          # the setting in force already infers less than it would
        job = self._tuning_job(*quiet.window.answered(), pooled=False)
        try:
            self.tune_runner(lambda: self._quiet_tuned.append((job.run(), quiet.start)))
        except RuntimeError:        # the tuner is shutting down
            return
        self._apply_quiet()

    def _apply_quiet(self) -> None:
        while self._quiet_tuned:
            tuned, tuned_since = self._quiet_tuned.popleft()
            if (tuned.informed or self._window is not None or self._tuning or self._learned is None
                    or self._held_from is not None):
                continue                    # the answer moved meanwhile, or a window took over
            self._held_from, self._learned = self._learned, tuned.setting
            self._quiet_since = tuned_since
            self._quiet_holds += 1

    def _quiet_bound(self, since: Optional[int] = None) -> int:
        """The longest bound a quiet run's setting may hold now (QUIET_EVENTS)."""
        quiet_for = self._decided - (self._quiet_since if since is None else since)
        return max(1, int(2.0 * (1.0 - self.target) * quiet_for / QUIET_EVENTS))

    def _answer_moved(self) -> None:
        """The answer changed: a quiet run's setting no longer holds, the one it replaced is back."""
        self._quiet = None
        if self._held_from is not None:
            self._learned, self._held_from = self._held_from, None

    def _track_segment(self, prepared: Prepared) -> None:
        previous, self._previous = self._previous, prepared
        if previous is None or previous.gray.shape != prepared.gray.shape:
            return
        self._segment.append(self.differencer.feature(previous, prepared, SEGMENT_FEATURE))
        self._since_profiled += 1
        if len(self._segment) >= self._frames_for(self.cfg.segment_s):
            self._end_segment()

    def _end_segment(self) -> None:
        key = segment_key(self._segment)
        self._segment = []
        if not self.learns or self._window is not None or self._tuning:
            return
        if not self.profiles:           # no window has been tuned yet (its results were lost): again
            self._start_window()
            return
        if self._since_profiled >= self._frames_for(self.cfg.recalibrate_s):
            self._start_window(confirmable=True)
            return
        found = self.profiles.lookup(key)
        if found is None:
            return
        spacing = self._new_segment_spacing(found)
        if spacing is not None and self._windows_since_profiled(spacing):
            self._profile_anew()
        elif self._held_from is not None:
            self._held_from = found.setting     # a quiet run's setting holds; this comes back after it
        else:
            self._learned = found.setting

    def _windows_since_profiled(self, windows: int) -> bool:
        return self._since_profiled >= windows * self._frames_for(self.cfg.calibration_s)

    def _profile_anew(self) -> None:
        """The camera shows what the profiles do not cover: a burst, profiled and added."""
        self._novel += 1
        self._start_window(confirmable=True)

    def _new_segment_spacing(self, found: Lookup) -> Optional[int]:
        """None when the segment is not new; else how many calibration windows must have passed
        since the last profiling before it is profiled. A segment unlike every profile is new when
        it is busier than the nearest: that setting may be too lax. A quieter one is left to the
        setting it gets, unless that setting's threshold has kept no frame since the last window
        was tuned (it has none, or one above every change the camera showed since: it responds to
        nothing) and the checks at the bound have found the answer changing under it: how much the
        picture moves is not how often the answer changes (on an aerial clip the picture moved
        most while the crossing was empty, and the crowd came as it calmed down). That setting is
        already losing the answer, so it waits one window, not four."""
        if not found.far:
            return None
        if not self._threshold_kept_since_tuning and self._bound_factor < 1.0:
            return FAILING_SPACING
        return PROFILING_SPACING if found.busier else None

    def _start_window(self, confirmable: bool = False, dense: bool = False) -> None:
        """A calibration window; `confirmable` (new-segment and periodic bursts, not the first window
        nor one the audits asked for) may stop at its half when that confirms the setting in force;
        `dense` infers every frame of it."""
        confirms = self._learned if confirmable and self._learned is not None else None
        self._quiet = None
        self._confirm_next = False          # the window infers its first frame: that confirms
        self._window = Window(self._frames_for(self.cfg.calibration_s), confirms,
                              1 if dense else self._window_stride(), self.target)

    def _window_stride(self) -> int:
        """A window's longest stride: `calibration_stride`, but no reuse in it older than a
        configured bound (`max_age_s`, `max_skip`)."""
        return max(1, min(self.cfg.calibration_stride, self._age_cap() + 1))

    # ------------------------------------------------------------- results
    def mark_inferred(self, prepared: Prepared) -> None:
        """Call when the frame is kept: later skipped frames compare with it and reuse its result."""
        if self._stale_next and self._reference is not None:
            _remember(self._stale_kept, prepared, (prepared, self._reference))
        if self._reference is not None and self.agreement is not None:
            _remember(self._replaced, prepared, (prepared, self._reference))
        self._stale_next = False
        self._reference = prepared
        self._skipped = 0

    def forget_reference(self) -> None:
        """The kept frame never got a result (dropped): the next frame is inferred."""
        self._reference = None
        self._skipped = 0

    def record_lost(self, prepared: Prepared) -> None:
        """A kept frame that will never get a result (dropped): its window tunes without it, and
        it checks nothing at the bound."""
        self._stale_kept.pop(id(prepared), None)
        self._replaced.pop(id(prepared), None)
        if self._quiet is not None and self._quiet.holds(prepared):
            self._quiet = None
        window = self._window
        if window is None or not window.holds(prepared):
            return
        window.lost.add(id(prepared))
        self._window_progressed(window)

    def record_result(self, prepared: Prepared, value: Any) -> None:
        """The model's result on a kept frame: calibration windows are tuned on these, and a frame
        kept at the staleness bound shortens the bound (the reused answer agreed less than the
        target) or lengthens it back towards the learned one (it agreed more)."""
        _remember(self._results, prepared, (prepared, value))
        self._check_at_bound(prepared, value)
        self._check_answer_changed(prepared, value)
        quiet = self._quiet
        if quiet is not None and quiet.holds(prepared):
            if not quiet.record(prepared, value, self.agreement):
                self._quiet = None
            elif quiet.complete():
                self._finish_quiet(quiet)
        window = self._window
        if window is None or not window.holds(prepared):
            return
        window.record(prepared, value, self.agreement)
        self._window_progressed(window)

    def _window_progressed(self, window: Window) -> None:
        if window.complete():
            self._finish_window()
        elif window.confirms is not None and not window.confirm_started and window.half_complete():
            self._confirm_half(window)

    def _replaced_result(self, table: dict, prepared: Prepared) -> Optional[tuple[Prepared, Any]]:
        """Take `prepared`'s entry from `table` (kept frame, the reference it replaced): that
        reference's result, or None when there is none to compare with (never registered, or the
        reference's result is gone: dropped, or long ago)."""
        kept = table.pop(id(prepared), None)
        if kept is None or kept[0] is not prepared or self.agreement is None:
            return None
        return self._remembered_result(kept[1])

    def _remembered_result(self, prepared: Optional[Prepared]) -> Optional[tuple[Prepared, Any]]:
        """`prepared`'s result while it is among the recent ones remembered, else None."""
        entry = self._results.get(id(prepared)) if prepared is not None else None
        return entry if entry is not None and entry[0] is prepared else None

    def _check_at_bound(self, prepared: Prepared, value: Any) -> None:
        reference = self._replaced_result(self._stale_kept, prepared)
        if reference is None or self._window is not None:
            return
        agreed = self.agreement(value, reference[1])
        step = BOUND_STEP ** ((agreed - self.target) / max(self.target, 1e-6))
        self._bound_factor = min(1.0, max(LOWEST_FACTOR, self._bound_factor * step))
        missed = agreed < self.target and not self._threshold_kept_since_check
        self._threshold_kept_since_check = False
        self._missed_in_a_row = self._missed_in_a_row + 1 if missed else 0
        if (self._missed_in_a_row >= MISSED_IN_A_ROW and self.learns and not self._tuning
                and self._windows_since_profiled(FAILING_SPACING)):
            self._missed_in_a_row = 0
            self._profile_anew()

    def _check_answer_changed(self, prepared: Prepared, value: Any) -> None:
        """Whether the frame still decided from changed the answer it replaced: then the next
        decision confirms it. Inside a window this only matters for the last frame it inferred, the one
        the filtering after the window starts from."""
        replaced = self._replaced_result(self._replaced, prepared)
        if replaced is None:
            return
        changed = self.agreement(value, replaced[1]) < 1.0
        if prepared is self._reference:
            self._confirm_next = not self.look_ahead and self._confirm_run < CONFIRMATIONS and changed
        if changed:
            self._answer_seen_changing(replaced[1])

    def _answer_seen_changing(self, before: Any) -> None:
        """A kept frame, a check at the bound or an audit found the answer changed from `before`:
        a quiet run's hold ends (_answer_moved).

        Every window so far was uninformed (its answer never changed, or too little to tell
        settings apart), so the setting in force only says that nothing happened while they were
        profiled: a threshold above every change they showed, a bound as long as a window. The
        first time the answer is then seen to change from `before` (a kept frame's result or an
        audit's), the camera is profiled at once, while it does what that setting knows nothing
        of, rather than after the checks at the bound have found it twice. That window infers every
        frame: a sparse one steps over the flicker of what just began and can learn nothing again.

        If that window stays uninformed too, whether the next change profiles at once depends on
        how the window ended: still away from `before` (a crowd came and stayed, steady for a
        window), the camera is active and the next change is profiled at once again; back at
        `before` (a ghost detection, a blip), each blip would buy another dense window, so the next
        comes at most once per PROFILING_SPACING windows, like new-segment bursts."""
        self._answer_moved()
        if (not self.learns or self._window is not None or self._tuning or not self.profiles
                or self.profiles.informed):
            return
        if self._first_changes and not self._change_lasted and not self._windows_since_profiled(PROFILING_SPACING):
            return
        self._first_changes += 1
        self._start_window(dense=True)
        self._first_change = (self._window, before)

    def _confirm_half(self, window: Window) -> None:
        """Tune the window's first half like a finished window (through `tune_runner`); whether it
        confirms the setting in force is decided when the result is applied."""
        window.confirm_started = True
        if self.agreement is None:
            return
        job = self._tuning_job(*window.answered(window.frames[:window.half]))
        try:
            self.tune_runner(lambda: self._confirmations.append((window, job.run())))
        except RuntimeError:        # the tuner is shutting down: the window runs to its end
            return
        self._apply_confirmations()

    def _apply_confirmations(self) -> None:
        while self._confirmations:
            window, tuned = self._confirmations.popleft()
            confirms = window.confirms
            if window is not self._window or confirms is None:
                continue                    # the window finished (or was restarted) meanwhile
            if (tuned.setting.feature, tuned.setting.threshold) != (confirms.feature, confirms.threshold):
                continue                    # the half learned something else: the window runs on
            self._window = None
            self._since_profiled = 0
            self._confirmed += 1
            self._tuned.append(tuned)
            self._tuning += 1
            self._apply_tuned()

    def _finish_window(self) -> None:
        """Plan the tuning of the finished window (a pure job over a snapshot), run it through
        `tune_runner` (inline, or on the daemon's tuner thread: it takes ~0.3-1 s and must not
        hold up the model's callbacks), and apply its result at the next decision."""
        window, self._window = self._window, None
        self._since_profiled = 0
        frames, values = window.answered()
        if self._first_change is not None and self._first_change[0] is window:
            before = self._first_change[1]
            self._change_lasted = (before is None or not values or self.agreement is None
                                   or self.agreement(inferred_value(values[-1]), before) < 1.0)
            self._first_change = None
        if len(frames) < max(2, window.frames_wanted // 2) or self.agreement is None:
            return                          # too little came back to tune on; profiled again soon
        job = self._tuning_job(frames, values)
        try:
            self.tune_runner(lambda: self._tuned.append(job.run()))
        except RuntimeError:        # the tuner is shutting down (stop, reload): nothing to tune for
            return
        self._tuning += 1
        self._apply_tuned()

    def _tuning_job(self, frames: list, values: list, pooled: bool = True) -> TuningJob:
        """The tuning of a window's frames, pooled with the most similar windows profiled before
        (`pooled`)."""
        key, pieces = window_key(self.differencer, frames, self._frames_for(self.cfg.segment_s))
        # Tune on this window pooled with the most similar windows profiled before: one short
        # window holds few changes of the answer, and a setting fitted to those alone is noisy.
        similar = self.profiles.nearest_windows(key, POOLED_WINDOWS - 1) if pooled else []
        job = TuningJob(
            segments=[frames] + [p.frames for p in similar], values=[values] + [p.values for p in similar],
            agreement=self.agreement, target=self.target, differencer=self.differencer,
            features=tunable_features(self.cfg, frames),
            preferred=self.preferred_feature,
            longest=min([longest_age(self.cfg, self.fps), len(frames) - 1] + [len(p.frames) - 1 for p in similar]),
            key=key, pieces=pieces, look_ahead=self.look_ahead)
        return job

    def _apply_tuned(self) -> None:
        while self._tuned:
            tuned = self._tuned.popleft()
            self._tuning -= 1
            self.profiles.add(tuned.key, tuned.setting, tuned.pieces, tuned.agreement, tuned.frames, tuned.values,
                              tuned.informed)
            # a window whose answer never changed cannot say which threshold is safe: where the
            # profiles can, theirs decides
            found = None if tuned.informed else self.profiles.lookup(tuned.key)
            self._learned = found.setting if found is not None else tuned.setting
            self._held_from = None
            self._factor = 1.0
            self._bound_factor = 1.0
            self._missed_in_a_row = 0
            self._threshold_kept_since_tuning = self._threshold_kept_since_check = False
            self.audits.reset_window()
            self._profiled += 1

    # ------------------------------------------------------------- audits
    def reused_share(self) -> float:
        """Share of decided frames that reused a result (1 before any: audits speak for all)."""
        kept = sum(self._kept.values())
        reused = sum(self._reused.values())
        return reused / (kept + reused) if kept + reused else 1.0

    def audit_fraction(self) -> float:
        if self.cfg.audit_fraction is not None:
            return self.cfg.audit_fraction
        share = self.reused_share()
        return audit_fraction_for_power(self.audits.spread(), share, share * self.fps)

    def record_audit(self, agreed: float) -> Optional[str]:
        """Record one audit; returns "tightened" or "relaxed" when the setting changed."""
        self.audits.record(agreed)
        if agreed < 1.0:
            reference = self._remembered_result(self._reference)
            self._answer_seen_changing(None if reference is None else reference[1])
        share = self.reused_share()
        if self.audits.needs_retune(self.target, share) and self._learned is not None:
            self._factor = max(LOWEST_FACTOR, self._factor * TIGHTEN)
            self.audits.reset_window()
            self._retunes += 1
            if self.learns and self._window is None and not self._tuning:
                self._start_window()
            return "tightened"
        if self._factor < 1.0 and self.audits.can_relax(self.target, share):
            self._factor = min(1.0, self._factor / TIGHTEN)
            self.audits.reset_window()
            self._retunes += 1
            return "relaxed"
        return None

    def set_threshold(self, threshold: Optional[float], feature: Optional[FeatureName] = None,
                      max_age: Optional[int] = None) -> None:
        """Apply a setting from outside (a tool); audits from the old setting no longer apply."""
        current = self._learned
        feature = feature or (current.feature if current else self._configured_feature())
        self._learned = None if threshold is None else Setting(
            threshold, max_age if max_age is not None else (current.max_age if current else self._configured_age()),
            feature)
        self._held_from = None              # a quiet run's hold ends with the setting it held
        self._quiet = None
        self._factor = 1.0
        self._bound_factor = 1.0
        self.audits.reset_window()
        self._retunes += 1

    # ------------------------------------------------------------- views
    def stats(self) -> dict[str, Any]:
        kept = sum(self._kept.values())
        reused = sum(self._reused.values())
        setting = self.setting
        return {
            "feature": self.feature,
            "threshold": None if setting is None or not math.isfinite(setting.threshold) else setting.threshold,
            "max_age_frames": None if setting is None else setting.max_age,
            "max_age_s": None if setting is None else round(setting.max_age / self.fps, 3),
            "state": "off" if not self.cfg.enabled else "calibrating" if self._window is not None else
                     "tuning" if self._tuning and self._learned is None else
                     "untuned" if setting is None else "filtering",
            "enabled": self.cfg.enabled,
            "frames": kept + reused,
            "kept": kept,
            "reused": reused,
            "kept_by_reason": dict(self._kept),
            "reused_by_reason": dict(self._reused),
            "reuse_fraction": reused / (kept + reused) if kept + reused else 0.0,
            "longest_reuse_frames": self._max_age_seen,
            "profiles": len(self.profiles),
            "profiled_windows": self._profiled,
            "novel_segments": self._novel,
            "confirmed_at_half": self._confirmed,
            "profiled_at_first_change": self._first_changes,
            "quiet_runs_held": self._quiet_holds,
            "audit_fraction": round(self.audit_fraction(), 4) if self.cfg.enabled else 0.0,
            "audited": self.audits.total,
            "audited_agreement": self.audits.mean_agreement,
            "audit_window": len(self.audits.recent),
            "wilson_low": self.audits.wilson_low(),
            "tighten_factor": round(self._factor, 4),
            "bound_factor": round(self._bound_factor, 4),
            "retunes": self._retunes,
        }
