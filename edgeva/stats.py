"""The metrics registry: per-camera and per-query counters, rates and latency histograms.

Accounting invariant, per query: every frame its camera delivered while the query was
attached is counted in `frames_in` and ends in exactly one bucket (inferred, reused,
offloaded, dropped[reason]); until then it is `in_flight`.
    frames_in == inferred + reused + offloaded + sum(dropped) + in_flight
`in_flight` is not derived from the other terms: each query keeps a ledger of the frames
(by sequence number) that entered it and have not left, so the identity is a real check.
A frame bucketed twice leaves the ledger once and breaks it at once; a lost frame (never
bucketed) stays in the ledger, is named after a stop and reported as stuck while running.

One module of ~400 lines: the counters, the registry that keeps them consistent under one
lock, and the table `edgeva stats` prints from their snapshot change together.
"""
from __future__ import annotations

import bisect
import math
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

from edgeva.messages import DropReason, Outcome


_HIST_MIN_S = 1e-4
_HIST_RATIO = 1.05
_HIST_BOUNDS = [_HIST_MIN_S * _HIST_RATIO ** i for i in range(340)]


class LatencyHistogram:
    """Log-bucketed histogram (about 5% relative error) from 0.1 ms to ~20 min; fixed memory."""

    _BOUNDS = _HIST_BOUNDS

    def __init__(self) -> None:
        self.counts = [0] * (len(self._BOUNDS) + 1)
        self.total = 0
        self.sum_s = 0.0
        self.max_s = 0.0

    def record(self, seconds: float) -> None:
        i = bisect.bisect_left(self._BOUNDS, seconds)
        self.counts[i] += 1
        self.total += 1
        self.sum_s += seconds
        self.max_s = max(self.max_s, seconds)

    def percentile(self, p: float) -> float | None:
        if self.total == 0:
            return None
        rank = max(1, math.ceil(self.total * p / 100.0))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                return min(self._BOUNDS[min(i, len(self._BOUNDS) - 1)], self.max_s)
        return self.max_s

    def summary_ms(self) -> dict[str, float | int | None]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000.0, 2)
        return {
            "count": self.total,
            "mean": ms(self.sum_s / self.total) if self.total else None,
            "p50": ms(self.percentile(50)), "p95": ms(self.percentile(95)),
            "p99": ms(self.percentile(99)), "max": ms(self.max_s) if self.total else None,
        }


class RateMeter:
    """Events per second over a sliding window."""

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self._times: deque[float] = deque()

    def mark(self) -> None:
        now = self._clock()
        self._times.append(now)
        self._trim(now)

    def rate(self) -> float:
        now = self._clock()
        self._trim(now)
        if len(self._times) < 2:
            return 0.0
        span = max(now - self._times[0], 1e-9)
        return len(self._times) / max(span, min(self.window_s, span))

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()


@dataclass
class CameraStats:
    camera: str
    source: str
    state: str = "starting"          # starting | streaming | reconnecting | ended | stopped | failed
    frames_delivered: int = 0
    frames_dropped_buffer: int = 0
    reconnects: int = 0
    last_error: str | None = None
    last_frame_at: float | None = None
    fps_in: RateMeter = field(default_factory=RateMeter)

    def snapshot(self) -> dict[str, Any]:
        return {
            "source": self.source, "state": self.state, "fps_in": round(self.fps_in.rate(), 2),
            "frames_delivered": self.frames_delivered,
            "frames_dropped_buffer": self.frames_dropped_buffer,
            "reconnects": self.reconnects, "last_error": self.last_error,
            "last_frame_age_s": None if self.last_frame_at is None
            else round(time.time() - self.last_frame_at, 3),
        }


@dataclass
class QueryStats:
    query: str
    camera: str
    frames_in: int = 0
    inferred: int = 0
    reused: int = 0
    offloaded: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    fps_out: RateMeter = field(default_factory=RateMeter)
    # Filled by later steps (model, filter state...); a callable is evaluated at snapshot time,
    # outside the registry's lock (it may take its owner's lock, and that owner records into the
    # registry while holding it).
    gauges: dict[str, Any] = field(default_factory=dict)
    # The in-flight ledger: seq -> copies in flight (a restarted camera counts from 0 again), and
    # when the oldest copy entered. Bounded by what the pipeline holds (buffers, queues).
    _holding: Counter = field(default_factory=Counter)
    _entered_mono: dict[int, float] = field(default_factory=dict)
    in_flight: int = 0
    left_unentered: int = 0          # bucketed without being in flight: a double count
    _newest_left_entered: float = float("-inf")   # when the newest frame that left had entered

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    @property
    def bucketed(self) -> int:
        return self.inferred + self.reused + self.offloaded + self.dropped_total

    def enter(self, seq: int, now: float) -> None:
        self.frames_in += 1
        self.in_flight += 1
        self._holding[seq] += 1
        self._entered_mono.setdefault(seq, now)

    def leave(self, seq: int | None) -> None:
        if seq is None or self._holding.get(seq, 0) <= 0:
            self.left_unentered += 1
            return
        self.in_flight -= 1
        self._newest_left_entered = max(self._newest_left_entered, self._entered_mono.get(seq, float("-inf")))
        self._holding[seq] -= 1
        if self._holding[seq] == 0:
            del self._holding[seq]
            self._entered_mono.pop(seq, None)

    def oldest_in_flight(self, now: float) -> tuple[int, float] | None:
        """(seq, seconds in flight) of the frame in flight longest, or None."""
        if not self._entered_mono:
            return None
        seq, entered = min(self._entered_mono.items(), key=lambda kv: kv[1])
        return seq, now - entered

    def held_seqs(self, limit: int = 5) -> list[int]:
        return sorted(self._holding)[:limit]

    def accounting_error(self, stopped: bool, now: float, stuck_after_s: float) -> str | None:
        if self.frames_in != self.bucketed + self.in_flight:
            return (f"{self.query}: frames_in={self.frames_in} but buckets={self.bucketed} + in_flight="
                    f"{self.in_flight} ({self.left_unentered} bucketed without being in flight)")
        if stopped and self.in_flight:
            ids = ", ".join(f"{self.camera}:{s}" for s in self.held_seqs())
            return f"{self.query}: {self.in_flight} frames never got an outcome (lost: {ids})"
        oldest = self.oldest_in_flight(now)
        # Stuck, not slow: newer frames have gone past it (a slow model keeps the order).
        if oldest is not None and oldest[1] > stuck_after_s and self._newest_left_entered > now - oldest[1]:
            return f"{self.query}: frame {self.camera}:{oldest[0]} in flight for {oldest[1]:.0f} s (lost?)"
        return None

    def snapshot(self) -> dict[str, Any]:
        return {
            "camera": self.camera, "frames_in": self.frames_in,
            "inferred": self.inferred, "reused": self.reused, "offloaded": self.offloaded,
            "dropped": dict(sorted(self.dropped.items())), "dropped_total": self.dropped_total,
            "in_flight": self.in_flight, "fps_out": round(self.fps_out.rate(), 2),
            "oldest_in_flight_s": None if (o := self.oldest_in_flight(time.monotonic())) is None else round(o[1], 3),
            "filtered_fraction": round(self.reused / max(1, self.frames_in - self.in_flight), 4),
            "latency_ms": self.latency.summary_ms(),
            **self.gauges,
        }


class StatsRegistry:
    """All counters of one daemon. Every pipeline step counts here; the control socket reads it."""

    def __init__(self, stuck_after_s: float = 300.0) -> None:
        self.stuck_after_s = stuck_after_s   # a frame in flight longer than this is reported as lost
        self._lock = threading.Lock()
        self.started_at = time.time()
        self.cameras: dict[str, CameraStats] = {}
        self.queries: dict[str, QueryStats] = {}
        self._queries_by_camera: dict[str, list[QueryStats]] = {}
        self.sections: dict[str, Callable[[], dict[str, Any]]] = {}   # extra sections (gpu, memory...)

    # -- topology
    def add_camera(self, camera: str, source: str) -> CameraStats:
        with self._lock:
            cs = self.cameras.get(camera)
            if cs is None or cs.source != source:
                cs = self.cameras[camera] = CameraStats(camera, source)
            self._queries_by_camera.setdefault(camera, [])
            return cs

    def add_query(self, query: str, camera: str) -> QueryStats:
        with self._lock:
            qs = self.queries.get(query)
            if qs is None or qs.camera != camera:
                if qs is not None:
                    self._queries_by_camera[qs.camera].remove(qs)
                qs = self.queries[query] = QueryStats(query, camera)
                self._queries_by_camera.setdefault(camera, []).append(qs)
            return qs

    def remove_query(self, query: str) -> None:
        with self._lock:
            qs = self.queries.pop(query, None)
            if qs is not None:
                self._queries_by_camera[qs.camera].remove(qs)

    def remove_camera(self, camera: str) -> None:
        with self._lock:
            self.cameras.pop(camera, None)
            for qs in self._queries_by_camera.pop(camera, []):
                self.queries.pop(qs.query, None)

    # -- camera events
    def camera_state(self, camera: str, state: str, error: str | None = None) -> None:
        with self._lock:
            cs = self.cameras.get(camera)
            if cs is not None:
                cs.state = state
                if error is not None:
                    cs.last_error = error
                if state == "reconnecting":
                    cs.reconnects += 1

    def frame_delivered(self, camera: str, seq: int) -> None:
        """A source produced a frame: it now belongs to (is in flight for) every query of its camera."""
        now = time.monotonic()
        with self._lock:
            cs = self.cameras.get(camera)
            if cs is not None:
                cs.frames_delivered += 1
                cs.last_frame_at = time.time()
                cs.fps_in.mark()
            for qs in self._queries_by_camera.get(camera, ()):
                qs.enter(seq, now)

    def camera_dropped(self, camera: str, reason: DropReason) -> None:
        """The camera's own count of a frame lost before its queries (each query buckets it itself)."""
        with self._lock:
            cs = self.cameras.get(camera)
            if cs is not None and reason is DropReason.BUFFER_FULL:
                cs.frames_dropped_buffer += 1

    def frame_dropped_at_camera(self, camera: str, reason: DropReason, seq: int) -> None:
        """A delivered frame left before reaching any query (buffer overflow, shutdown), bucketed
        here for every query of the camera; for readers without a pipeline around them."""
        self.camera_dropped(camera, reason)
        with self._lock:
            for qs in self._queries_by_camera.get(camera, ()):
                qs.dropped[reason.value] = qs.dropped.get(reason.value, 0) + 1
                qs.leave(seq)

    # -- query outcomes
    def record(self, qs: QueryStats, outcome: Outcome, latency_s: float | None = None,
               reason: DropReason | None = None, *, seq: int | None) -> None:
        """Bucket frame `seq` (it leaves the in-flight ledger) in the stats a runtime was given:
        after a reload moved its query, a retired runtime's late results land in its own
        (retired) counters, never in its successor's."""
        with self._lock:
            qs.leave(seq)
            if outcome is Outcome.DROPPED:
                key = (reason or DropReason.ERROR).value
                qs.dropped[key] = qs.dropped.get(key, 0) + 1
                return
            if outcome is Outcome.INFERRED:
                qs.inferred += 1
            elif outcome is Outcome.REUSED:
                qs.reused += 1
            elif outcome is Outcome.OFFLOADED:
                qs.offloaded += 1
            qs.fps_out.mark()
            if latency_s is not None:
                qs.latency.record(latency_s)

    def set_gauges(self, query: str, **values: Any) -> None:
        with self._lock:
            qs = self.queries.get(query)
            if qs is not None:
                qs.gauges.update(values)

    # -- reading
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            snap: dict[str, Any] = {
                "time": time.time(), "uptime_s": round(time.time() - self.started_at, 3),
                "cameras": {k: v.snapshot() for k, v in sorted(self.cameras.items())},
                "queries": {k: v.snapshot() for k, v in sorted(self.queries.items())},
            }
            sections = list(self.sections.items())
        for query in snap["queries"].values():      # gauges that read their owner's state, unlocked here
            for key, value in query.items():
                if callable(value):
                    query[key] = value()
        for name, provider in sections:
            try:
                snap[name] = provider()
            except Exception as exc:  # a broken section must not take the others down
                snap[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return snap

    def accounting_errors(self, stopped: bool = False) -> list[str]:
        """Queries whose buckets and in-flight ledger do not add up to what came in (a double
        count or a frame lost without a bucket), that still hold frames once everything has
        stopped, or whose oldest frame in flight is older than `stuck_after_s`; empty when
        consistent."""
        now = time.monotonic()
        with self._lock:
            errors = [q.accounting_error(stopped, now, self.stuck_after_s) for q in self.queries.values()]
        return [e for e in errors if e]


def format_table(snapshot: dict[str, Any]) -> str:
    """The human-readable view `edgeva stats` prints."""
    lines: list[str] = []
    up = snapshot.get("uptime_s", 0.0)
    lines.append(f"edgeva  uptime {_duration(up)}")
    cams = snapshot.get("cameras", {})
    lines.append("")
    lines.append(_row(["camera", "state", "fps in", "delivered", "buf drops", "reconnects", "last error"],
                      [14, 12, 7, 10, 9, 10, 0]))
    for name, c in cams.items():
        lines.append(_row([name, c["state"], f"{c['fps_in']:.1f}", c["frames_delivered"],
                           c["frames_dropped_buffer"], c["reconnects"], (c.get("last_error") or "")[:40]],
                          [14, 12, 7, 10, 9, 10, 0]))
    lines.append("")
    widths = [16, 12, 7, 8, 8, 8, 9, 8, 8, 8, 8]
    lines.append(_row(["query", "camera", "fps out", "in", "inferred", "reused", "offloaded",
                       "dropped", "p50 ms", "p95 ms", "p99 ms"], widths))
    for name, q in snapshot.get("queries", {}).items():
        lat = q["latency_ms"]
        lines.append(_row([name, q["camera"], f"{q['fps_out']:.1f}", q["frames_in"], q["inferred"],
                           q["reused"], q["offloaded"], q["dropped_total"], _num(lat["p50"]),
                           _num(lat["p95"]), _num(lat["p99"])], widths))
        if q.get("weights") == "random init":
            lines.append("  weights: random init (no weights file: these counts are noise)")
        if q["dropped"]:
            reasons = ", ".join(f"{k}={v}" for k, v in q["dropped"].items())
            lines.append(f"  dropped: {reasons}")
        filt = q.get("filter")
        if isinstance(filt, dict) and filt.get("enabled"):
            audit = filt.get("audited_agreement")
            low = filt.get("wilson_low")
            lines.append(f"  filter: {filt.get('state')}, {filt.get('feature')} > {filt.get('threshold')}, max age "
                         f"{filt.get('max_age_frames')} frames ({filt.get('max_age_s')} s), "
                         f"profiles {filt.get('profiles', 0)}, audit share {filt.get('audit_fraction')}, "
                         f"audited {filt.get('audited')}"
                         + (f" agreement {audit:.3f} (low {low:.3f})" if audit is not None and low is not None else "")
                         + f", retunes {filt.get('retunes', 0)}")
    for section in sorted(set(snapshot) - {"time", "uptime_s", "cameras", "queries"}):
        value = snapshot[section]
        if not value:
            continue
        lines.append("")
        if isinstance(value, dict):
            lines.append(f"{section}:")
            lines.extend(f"  {k}: {_flat(v)}" for k, v in value.items())
        else:
            lines.append(f"{section}: {value}")
    return "\n".join(lines)


def _row(cells: Iterable[Any], widths: list[int]) -> str:
    out = []
    for cell, w in zip(cells, widths):
        s = str(cell)
        out.append(s if w == 0 else s[:w].ljust(w))
    return " ".join(out).rstrip()


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def _duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s"


def _flat(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_flat(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
