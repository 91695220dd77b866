"""Fan-out of result records to the configured sinks (SQLite, ZeroMQ PUB, in-memory taps)."""
from __future__ import annotations

import logging
import threading
from typing import Callable, Protocol

from edgeva.messages import QueryResult

log = logging.getLogger("edgeva.results")


class Sink(Protocol):
    def write(self, result: QueryResult) -> None: ...

    def close(self) -> None: ...


class ResultHub:
    """Every query emits into the hub; each sink gets every record. A failing sink is logged, not fatal."""

    def __init__(self) -> None:
        self._sinks: list[Sink] = []
        self._taps: list[Callable[[QueryResult], None]] = []
        self._lock = threading.Lock()
        self.sink_errors = 0

    def add_sink(self, sink: Sink) -> None:
        with self._lock:
            self._sinks.append(sink)

    def add_tap(self, tap: Callable[[QueryResult], None]) -> None:
        with self._lock:
            self._taps.append(tap)

    def emit(self, result: QueryResult) -> None:
        with self._lock:
            targets = [*self._sinks]
            taps = [*self._taps]
        for sink in targets:
            try:
                sink.write(result)
            except Exception:
                self.sink_errors += 1
                if self.sink_errors in (1, 10, 100) or self.sink_errors % 1000 == 0:
                    log.exception("sink %s failed (%d errors so far)", type(sink).__name__, self.sink_errors)
        for tap in taps:
            try:
                tap(result)
            except Exception:   # emit runs inside a query's bookkeeping: a tap must not break it
                log.exception("result tap failed")

    def close(self) -> None:
        with self._lock:
            sinks, self._sinks = self._sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception:
                log.exception("closing sink %s failed", type(sink).__name__)
