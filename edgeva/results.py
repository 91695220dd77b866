"""Fan-out of result records to the configured sinks (SQLite, ZeroMQ PUB, in-memory taps).

Every record a sink does not keep is counted as lost: a write that raises, and whatever the
sink itself reports lost (`counts()["lost"]`: a full queue, a commit that failed on a full
disk). `losing()` tells health whether that count moved recently.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Protocol

from edgeva.messages import QueryResult

log = logging.getLogger("edgeva.results")

LOSING_WINDOW_S = 60.0   # health is degraded while results were lost within this window


class Sink(Protocol):
    def write(self, result: QueryResult) -> None: ...

    def close(self) -> None: ...

    def counts(self) -> dict[str, int]:
        """At least `written` and `lost` (records accepted by write() that never reach the sink's target)."""


class ResultHub:
    """Every query emits into the hub; each sink gets every record. A failing sink is logged and
    counted, never fatal."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._sinks: list[Sink] = []
        self._closed: list[Sink] = []         # still counted in the final stats
        self._taps: list[Callable[[QueryResult], None]] = []
        self._lock = threading.Lock()
        self._clock = clock
        self.emitted = 0
        self.sink_errors = 0                  # writes that raised (each one a lost record)
        self._write_errors: dict[int, int] = {}
        self._last_lost = 0
        self._last_loss_mono: float | None = None

    def add_sink(self, sink: Sink) -> None:
        with self._lock:
            self._sinks.append(sink)
            self._write_errors[id(sink)] = 0

    def add_tap(self, tap: Callable[[QueryResult], None]) -> None:
        with self._lock:
            self._taps.append(tap)

    def emit(self, result: QueryResult) -> None:
        with self._lock:
            targets = [*self._sinks]
            taps = [*self._taps]
            self.emitted += 1
        for sink in targets:
            try:
                sink.write(result)
            except Exception:
                with self._lock:
                    self.sink_errors += 1
                    self._write_errors[id(sink)] = self._write_errors.get(id(sink), 0) + 1
                    errors = self.sink_errors
                if errors in (1, 10, 100) or errors % 1000 == 0:
                    log.exception("sink %s failed (%d errors so far)", type(sink).__name__, errors)
        for tap in taps:
            try:
                tap(result)
            except Exception:   # emit runs inside a query's bookkeeping: a tap must not break it
                log.exception("result tap failed")

    def sink_counts(self) -> dict[str, dict[str, int]]:
        """Per sink: written, lost (its own losses plus writes that raised), and what else it reports."""
        with self._lock:
            sinks = [(s, self._write_errors.get(id(s), 0)) for s in self._sinks + self._closed]
        out: dict[str, dict[str, int]] = {}
        for sink, raised in sinks:
            try:
                counts = dict(sink.counts())
            except Exception:   # a sink without counts, or a broken one: what the hub saw
                counts = {}
            counts["lost"] = counts.get("lost", 0) + raised
            name = type(sink).__name__
            out[name if name not in out else f"{name}#{len(out)}"] = counts
        return out

    def lost(self) -> int:
        return sum(c["lost"] for c in self.sink_counts().values())

    def losing(self, window_s: float = LOSING_WINDOW_S) -> bool:
        """Results were lost within the last `window_s` seconds (checked on each call)."""
        lost = self.lost()
        now = self._clock()
        with self._lock:
            if lost > self._last_lost:
                self._last_lost, self._last_loss_mono = lost, now
            return self._last_loss_mono is not None and now - self._last_loss_mono < window_s

    def stats(self) -> dict[str, object]:
        sinks = self.sink_counts()
        return {"emitted": self.emitted, "lost": sum(c["lost"] for c in sinks.values()),
                "losing": self.losing(), "sinks": sinks}

    def close(self) -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, []
            self._closed.extend(sinks)
        for sink in sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %s failed", type(sink).__name__)
