"""Query runtimes: what happens to a frame once a camera hands it to one query.

Each runtime buckets every submitted frame exactly once (inferred, reused, offloaded or
dropped with a reason) in the stats registry and emits a result record for the first three.
"""
from __future__ import annotations

import time

from edgeva.config import QueryConfig
from edgeva.messages import Frame, Outcome, QueryResult
from edgeva.results import ResultHub
from edgeva.stats import StatsRegistry


class PassthroughQuery:
    """No model: the frame itself is the result (its mean intensity). Exercises the whole path."""

    def __init__(self, cfg: QueryConfig, stats: StatsRegistry, hub: ResultHub):
        self.cfg = cfg
        self.query_id = cfg.id
        self.stats = stats
        self.hub = hub
        stats.add_query(cfg.id, cfg.camera)

    def submit(self, frame: Frame) -> None:
        value = {"mean": round(float(frame.image.mean()), 2), "shape": list(frame.image.shape)}
        latency = time.monotonic() - frame.t_mono
        self.stats.outcome(self.query_id, Outcome.INFERRED, latency)
        self.hub.emit(QueryResult(self.query_id, frame.camera, frame.seq, frame.t_capture,
                                  Outcome.INFERRED, value, latency, source_seq=frame.seq))

    def close(self) -> None:
        pass
