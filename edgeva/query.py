"""Query runtimes: what happens to a frame once a camera hands it to one query.

Each runtime buckets every submitted frame exactly once (inferred, reused, offloaded or
dropped with a reason) in the stats registry and emits one result record for it, a dropped
frame included (outcome `dropped`, with its reason), so a consumer sees every frame once.

One room of ~450 lines: ModelQuery's keeping, reusing, looking ahead (holding a gap's frames)
and its worker callbacks share one lock and one view of the kept frames still in the model;
what a gap does is planned in edgeva.gaps.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional

from edgeva.config import QueryConfig
from edgeva.filtering import Decision, QueryFilter, SceneTracker, audit_draw
from edgeva.gaps import AnswerFromLeft, Gap, plan_gap
from edgeva.messages import DropReason, Frame, Outcome, QueryResult
from edgeva.results import ResultHub
from edgeva.stats import QueryStats, StatsRegistry
from edgeva.work import ExecutorPort, WorkItem

log = logging.getLogger("edgeva.query")

# Batch replay waits at most this long for the results its filter's next decision needs before it
# decides without them (and, for this query, never waits again: something holds its results back).
RESULTS_WAIT_S = 600.0


def _runs_each_frame_once(port: ExecutorPort) -> bool:
    """A port that does not say so runs every item it is given."""
    return bool(getattr(port, "runs_each_frame_once", False))


class FrameView:
    """One delivered frame plus what its camera's queries derive from it, computed once."""

    __slots__ = ("frame", "fps", "_scenes", "_prepared", "_audit_draw", "_model_runs")

    def __init__(self, frame: Frame, fps: Optional[float] = None, scenes: Optional[dict[Any, SceneTracker]] = None):
        self.frame = frame
        self.fps = fps                    # the camera's frame rate: staleness bounds are in seconds
        self._scenes = scenes if scenes is not None else {}   # the camera's background per differencer
        self._prepared: dict[Any, Any] = {}
        self._audit_draw: Optional[float] = None
        self._model_runs: set[str] = set()   # ports that run each frame once and have this one queued

    @property
    def audit_draw(self) -> float:
        """The frame's audit draw, shared by the camera's queries: they audit the same frames."""
        if self._audit_draw is None:
            self._audit_draw = audit_draw(self.frame.camera, self.frame.seq)
        return self._audit_draw

    def model_runs(self, port: ExecutorPort) -> bool:
        """A query before this one (in the camera's order) keeps or audits this frame on `port`,
        which runs a frame once however many queries ask: keeping it costs no model run."""
        return _runs_each_frame_once(port) and port.key in self._model_runs

    def note_model_run(self, port: ExecutorPort) -> None:
        """This frame goes to `port`'s model (kept or audited)."""
        if _runs_each_frame_once(port):
            self._model_runs.add(port.key)

    def prepared(self, differencer: Any) -> Any:
        """The filter's downscaled frame for this differencer (shared by queries using the same one)."""
        p = self._prepared.get(differencer)
        if p is None:
            scene = self._scenes.get(differencer)
            if scene is None:
                scene = self._scenes[differencer] = SceneTracker(differencer)
            p = self._prepared[differencer] = scene.prepare(self.frame.image)
        return p


def emit_dropped(stats: StatsRegistry, qstats: QueryStats, hub: ResultHub, query_id: str, frame: Frame,
                 reason: DropReason) -> None:
    """Bucket `frame` as dropped for one query and emit its `dropped` result record."""
    latency = time.monotonic() - frame.t_mono
    stats.record(qstats, Outcome.DROPPED, reason=reason, seq=frame.seq)
    hub.emit(QueryResult.of(query_id, frame, Outcome.DROPPED, None, latency, extra={"reason": reason.value}))


class PassthroughQuery:
    """No model: the frame itself is the result (its mean intensity). Exercises the whole path."""

    def __init__(self, cfg: QueryConfig, stats: StatsRegistry, hub: ResultHub):
        self.cfg = cfg
        self.query_id = cfg.id
        self.stats = stats
        self.hub = hub
        self.qstats = stats.add_query(cfg.id, cfg.camera)

    def submit(self, view: FrameView) -> None:
        frame = view.frame
        value = {"mean": round(float(frame.image.mean()), 2), "shape": list(frame.image.shape)}
        latency = time.monotonic() - frame.t_mono
        self.stats.record(self.qstats, Outcome.INFERRED, latency, seq=frame.seq)
        self.hub.emit(QueryResult.of(self.query_id, frame, Outcome.INFERRED, value, latency, source_seq=frame.seq))

    def drop(self, frame: Frame, reason: DropReason) -> None:
        emit_dropped(self.stats, self.qstats, self.hub, self.query_id, frame, reason)

    def end_of_stream(self) -> None:
        """Nothing is held."""

    def close(self) -> None:
        """Nothing is held."""


@dataclass
class _Inference:
    """A kept frame on its way through the model, and the skipped frames that will reuse its result."""

    seq: int
    prepared: Any = None                   # the filter's view of the frame (calibration needs its result)
    waiting: list[tuple[Frame, Decision]] = field(default_factory=list)
    value: Any = None
    done: bool = False
    failed: Optional[DropReason] = None    # why it never got a result


@dataclass
class _Audit:
    reference: _Inference


class ModelQuery:
    """filter → (keep) model worker → task → result; (skip) reuse the last inferred result.

    A skipped frame reuses the result of the last *kept* frame; if that frame is still in
    the model, the skipped frame waits for it so results never go backwards in time. Looking
    ahead (`filter.look_ahead`, batch replay only), it waits for the next kept frame's result
    too, and a gap whose ends disagree is bisected (edgeva.gaps).
    """

    def __init__(self, cfg: QueryConfig, stats: StatsRegistry, hub: ResultHub, worker: ExecutorPort,
                 task: Any, query_filter: Optional[QueryFilter] = None, backpressure: bool = False):
        self.cfg = cfg
        # Batch replay ('fast'): wait for the model instead of dropping when its queue is full (the
        # wait reaches the decoder: back-pressure), no wall-clock deadline, and media time for the
        # SLA rate, so the results do not depend on how fast this machine is.
        self._batch = backpressure
        self._wait_for_filter_results = backpressure
        self._submit_wait_s = 3600.0 if backpressure else 0.0
        self.query_id = cfg.id
        self.stats = stats
        self.hub = hub
        self.worker = worker
        self.task = task
        self.filter = query_filter
        self._lock = threading.Lock()
        self._results_in = threading.Condition(self._lock)   # a kept frame got its result, or never will
        self._latest: Optional[_Inference] = None      # newest kept frame (maybe still running)
        self._last_done: Optional[_Inference] = None   # newest kept frame with a result
        self._min_interval = 1.0 / cfg.sla.fps if cfg.sla.fps else 0.0
        self._last_considered_t: Optional[float] = None
        self._audits_in_flight = 0     # audit items submitted whose agreement the filter has not had yet
        # the filter's tuner replays the bisection only when the query does it: one switch for both
        self._look_ahead = backpressure and query_filter is not None and query_filter.look_ahead
        self._gap: Optional[Gap[_Inference]] = None            # frames held since the last kept frame
        self._closed_gaps: deque[Gap[_Inference]] = deque()    # waiting for their ends' results, in order
        self._bisected = 0             # frames inferred to locate a change in a gap (and a recording's last)
        self.qstats = stats.add_query(cfg.id, cfg.camera)
        stats.set_gauges(cfg.id, model=worker.key, task=cfg.task.type,
                         accuracy_target=cfg.accuracy_target, filter=self._filter_stats)

    # ------------------------------------------------------------- intake
    def submit(self, view: FrameView) -> None:
        frame = view.frame
        if self._look_ahead:
            self._answer_gaps()
        with self._lock:
            self._await_filter_results()
            decision = self._decide(view)
            if decision.keep:
                item: Optional[WorkItem] = self._keep(frame, view)
            else:
                self._reuse(frame, decision)
                item = None
                if decision.audit and self._latest is not None:
                    item = WorkItem(self, frame, self._deadline(frame), audit=True, context=_Audit(self._latest))
                    self._audits_in_flight += 1
        if item is None:
            return
        view.note_model_run(self.worker)
        self._send(item, wait_s=0.0 if item.audit and not self._batch else self._submit_wait_s)

    def _send(self, item: WorkItem, wait_s: Optional[float] = None) -> None:
        """Hand `item` to the worker, outside the lock (the worker's callbacks take it, and a
        blocking submit waits on the worker); a full queue drops it."""
        if not self.worker.submit(item, wait_s=self._submit_wait_s if wait_s is None else wait_s):
            self.dropped(item, DropReason.QUEUE_FULL)

    def _await_filter_results(self) -> None:
        """Batch replay: when the filter's next decision depends on results still in the model
        (QueryFilter.awaiting_results says which, and audits: one can tighten the setting), wait
        for them instead of deciding ahead without them, so the decisions do not depend on how far
        decoding runs ahead of the model. Live sources never wait here: their results come within
        the SLA latency."""
        query_filter = self.filter
        if not self._wait_for_filter_results or query_filter is None:
            return

        def ready() -> bool:
            return not query_filter.awaiting_results() and not self._audits_in_flight

        if not self._results_in.wait_for(ready, timeout=RESULTS_WAIT_S):
            self._wait_for_filter_results = False
            log.warning("query %s: results the filter waits for overdue after %.0f s; deciding without them from now on",
                        self.query_id, RESULTS_WAIT_S)

    def _decide(self, view: FrameView) -> Decision:
        frame = view.frame
        # Monotonic time: a wall-clock step (NTP at boot) must not stop inference.
        t = frame.t_media if self._batch and frame.t_media is not None else frame.t_mono
        if self._min_interval and self._last_considered_t is not None and self._latest is not None \
                and 0 <= t - self._last_considered_t < self._min_interval * 0.999:
            return Decision(False, "rate", None, 0)
        self._last_considered_t = t
        if self.filter is None:
            return Decision(True, "disabled", None, 0)
        self.filter.set_fps(view.fps)
        return self.filter.decide(view.prepared(self.filter.differencer), view.audit_draw,
                                  model_runs=view.model_runs(self.worker))

    def _keep(self, frame: Frame, view: FrameView) -> WorkItem:
        """The frame becomes the reference that following skipped frames reuse (and wait for)."""
        inference = _Inference(frame.seq)
        if self.filter is not None:
            inference.prepared = view.prepared(self.filter.differencer)
            self.filter.mark_inferred(inference.prepared)
        self._latest = inference
        if self._look_ahead:
            self._close_gap(inference)
        return WorkItem(self, frame, self._deadline(frame), context=inference)

    def _reuse(self, frame: Frame, decision: Decision) -> None:
        if self._look_ahead and self._gap is not None:
            self._gap.frames.append(frame)        # answered once the next kept frame's result is in
            return
        latest = self._latest
        if latest is not None and not latest.done and not latest.failed:
            latest.waiting.append((frame, decision))
            return
        source = self._last_done
        failed = latest.failed if latest is not None else None
        if source is None or (failed and not self._within_bound(frame, source)):
            # Nothing inferred yet, or the kept frame it should reuse was dropped and the result
            # before it is older than the staleness bound: dropped, for that frame's reason.
            self.drop(frame, failed or DropReason.ERROR)
            return
        self._emit_reused(frame, source)

    # ------------------------------------------------------------- looking ahead (edgeva.gaps)
    def _close_gap(self, right: _Inference) -> None:
        """A kept frame ends the gap of frames held since the one before (under the lock)."""
        gap, self._gap = self._gap, Gap(right)
        if gap is not None:
            self._close_gap_at(gap, right)

    def _answer_gaps(self, wait: bool = False) -> None:
        """Answer the closed gaps in order while both their ends have results (`wait`: wait for
        them, as at the end of the stream). Runs on the camera's intake thread, never in the
        worker's callback: a bisection's item can wait there for room in the model's queue."""
        while True:
            with self._lock:
                if not self._closed_gaps:
                    return
                gap = self._closed_gaps[0]

                def ends_in() -> bool:
                    return all(end.done or end.failed for end in (gap.left, gap.right))

                if not ends_in() and not wait:
                    return
                self._closed_gaps.popleft()
                if not ends_in() and not self._results_in.wait_for(ends_in, timeout=RESULTS_WAIT_S):
                    for frame in gap.frames:      # their ends' results never came
                        self.drop(frame, DropReason.ERROR)
                    continue
                item = self._apply_gap(gap)
            if item is not None:
                self._send(item)

    def _apply_gap(self, gap: Gap[_Inference]) -> Optional[WorkItem]:
        """Emit the gap's frames, or split it at the frame to infer and return that frame's item
        (under the lock). An end that failed leaves the frames the left answer within the
        staleness bound, else they are dropped for its reason, as frames waiting on a dropped
        kept frame are."""
        left, right = gap.left, gap.right
        failed = left.failed or right.failed
        if failed:
            for frame in gap.frames:
                if left.done and self._within_bound(frame, left):
                    self._emit_reused(frame, left)
                else:
                    self.drop(frame, failed)
            return None
        plan = plan_gap(gap, left.seq, right.seq, left.value, right.value, self.task.agreement)
        if isinstance(plan, AnswerFromLeft):
            for frame in gap.frames:
                self._emit_reused(frame, left)
            return None
        middle = _Inference(plan.frame.seq)
        self._bisected += 1
        self._closed_gaps.appendleft(Gap(middle, plan.after, right))
        self._closed_gaps.appendleft(Gap(left, plan.before, middle))
        return WorkItem(self, plan.frame, self._deadline(plan.frame), context=middle)

    def end_of_stream(self) -> None:
        """The source ended (a recording without loop): the frames held after the last kept frame
        close their gap at the last of them, which is inferred, and every gap is answered."""
        if not self._look_ahead:
            return
        item = None
        with self._lock:
            gap, self._gap = self._gap, None
            if gap is not None and gap.frames:
                last = gap.frames.pop()
                right = _Inference(last.seq)
                self._bisected += 1
                self._close_gap_at(gap, right)
                item = WorkItem(self, last, self._deadline(last), context=right)
        if item is not None:
            self._send(item)
        self._answer_gaps(wait=True)

    def _close_gap_at(self, gap: Gap[_Inference], right: _Inference) -> None:
        gap.right = right
        if gap.frames:
            self._closed_gaps.append(gap)

    def close(self) -> None:
        """The camera stops (shutdown, reload): frames still held are dropped with `shutdown`."""
        with self._lock:
            held = [frame for gap in self._closed_gaps for frame in gap.frames]
            held += self._gap.frames if self._gap is not None else []
            self._closed_gaps.clear()
            if self._gap is not None:
                self._gap.frames = []
            for frame in held:
                self.drop(frame, DropReason.SHUTDOWN)

    def _within_bound(self, frame: Frame, source: _Inference) -> bool:
        setting = self.filter.setting if self.filter is not None else None
        return setting is None or frame.seq - source.seq <= setting.max_age

    def _deadline(self, frame: Frame) -> float:
        return math.inf if self._batch else frame.t_mono + self.cfg.sla.latency_ms / 1000.0

    def drop(self, frame: Frame, reason: DropReason) -> None:
        emit_dropped(self.stats, self.qstats, self.hub, self.query_id, frame, reason)

    # ------------------------------------------------------------- worker callbacks
    def complete_offloaded(self, item: WorkItem, output: Any, finished_mono: float, tier: str) -> None:
        """A tier's worker ran the model: same as complete, counted as offloaded."""
        self.complete(item, output, finished_mono, tier)

    def complete(self, item: WorkItem, output: Any, finished_mono: float, tier: Optional[str] = None) -> None:
        try:
            value = self.task.value(output)
        except Exception:
            log.exception("query %s: task failed on %s", self.query_id, item.frame.frame_id)
            self.dropped(item, DropReason.ERROR)
            return
        if item.audit:
            self._audited(item.context, value)
            return
        inference: _Inference = item.context
        frame = item.frame
        with self._lock:
            inference.value, inference.done = value, True
            if self._last_done is None or inference.seq > self._last_done.seq:
                self._last_done = inference
            latency = finished_mono - frame.t_mono
            outcome = Outcome.INFERRED if tier is None else Outcome.OFFLOADED
            self.stats.record(self.qstats, outcome, latency, seq=frame.seq)
            self.hub.emit(QueryResult.of(self.query_id, frame, outcome, value, latency, 0, frame.seq,
                                         extra={} if tier is None else {"tier": tier}))
            waiting, inference.waiting = inference.waiting, []
            for waiting_frame, _ in waiting:
                self._emit_reused(waiting_frame, inference)
            if self.filter is not None and inference.prepared is not None:
                try:        # the frame has its record; a filter bug must not take it back
                    self.filter.record_result(inference.prepared, value)
                except Exception:
                    log.exception("query %s: the filter failed on the result of %s", self.query_id, frame.frame_id)
            self._results_in.notify_all()

    def dropped(self, item: WorkItem, reason: DropReason) -> None:
        if item.audit:
            with self._lock:
                self._audit_done()
            return
        inference: _Inference = item.context
        with self._lock:
            inference.failed = reason
            self.drop(item.frame, reason)
            waiting, inference.waiting = inference.waiting, []
            for frame, _ in waiting:
                # The staleness bound holds through a drop: a result older than it is not reused.
                if self._last_done is not None and self._within_bound(frame, self._last_done):
                    self._emit_reused(frame, self._last_done)
                else:
                    self.drop(frame, reason)
            if self.filter is not None:
                if inference.prepared is not None:
                    self.filter.record_lost(inference.prepared)
                if self._latest is inference:
                    self.filter.forget_reference()   # compare the next frame with something we have a result for
            self._results_in.notify_all()

    def _emit_reused(self, frame: Frame, source: _Inference) -> None:
        latency = time.monotonic() - frame.t_mono
        self.stats.record(self.qstats, Outcome.REUSED, latency, seq=frame.seq)
        self.hub.emit(QueryResult.of(self.query_id, frame, Outcome.REUSED, source.value, latency,
                                     frame.seq - source.seq, source.seq))

    def _audited(self, audit: _Audit, value: Any) -> None:
        change = None
        with self._lock:
            self._audit_done()
            if self.filter is not None and audit.reference.done:
                change = self.filter.record_audit(self.task.agreement(value, audit.reference.value))
        if change == "tightened":
            log.warning("query %s: audited agreement confidently below %.3f; filter tightened and re-profiling",
                        self.query_id, self.cfg.accuracy_target)
        elif change == "relaxed":
            log.info("query %s: audited agreement back above %.3f; filter relaxed", self.query_id,
                     self.cfg.accuracy_target)

    def _audit_done(self) -> None:
        """An audit item came back (under the lock): batch replay's next decision may go on."""
        self._audits_in_flight = max(0, self._audits_in_flight - 1)
        self._results_in.notify_all()

    # ------------------------------------------------------------- views
    def _filter_stats(self) -> dict[str, Any]:
        if self.filter is None:
            return {"enabled": False}
        with self._lock:     # the filter's audit window changes under this lock
            stats = self.filter.stats()
            stats["look_ahead"] = self._look_ahead
            if self._look_ahead:
                stats["bisected"] = self._bisected
            return stats
