"""Per-camera wiring: reader → frame buffer → dispatcher → each query's runtime.

A CameraPipeline owns its reader thread and one dispatcher thread; queries never share
state through it. Accounting: the reader counts a frame as delivered (for every query of
the camera) before buffering it, buffer overflow counts `buffer-full`, and frames still
buffered at stop count `shutdown`; everything dispatched is the query runtime's to bucket.
"""
from __future__ import annotations

import logging
import threading
from typing import Protocol

from edgeva.config import CameraConfig
from edgeva.messages import DropReason, Frame, Outcome
from edgeva.query import FrameView
from edgeva.redaction import redact
from edgeva.sources import CameraReader, CameraState, FrameBuffer
from edgeva.stats import QueryStats, StatsRegistry

log = logging.getLogger("edgeva.pipeline")


class QueryRuntime(Protocol):
    """What a camera pipeline needs of a query: take a frame and bucket it exactly once.

    `submit` raises only when it has not bucketed the frame; the pipeline then counts it
    as dropped with reason `error`.
    """

    query_id: str
    qstats: QueryStats          # the counters this runtime buckets into

    def submit(self, view: FrameView) -> None: ...


class CameraPipeline:
    def __init__(self, cfg: CameraConfig, queries: list[QueryRuntime], stats: StatsRegistry):
        self.cfg = cfg
        self.queries = list(queries)
        self.stats = stats
        stats.add_camera(cfg.id, redact(cfg.source))   # stats are shown: never a password
        self.buffer = FrameBuffer(cfg.buffer, on_drop=self._on_buffer_drop)
        self.reader = CameraReader(cfg, self.buffer, stats)
        self._stop = threading.Event()
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"dispatch-{cfg.id}", daemon=True)

    @property
    def camera_id(self) -> str:
        return self.cfg.id

    def start(self) -> None:
        self._dispatcher.start()
        self.reader.start()

    def alive(self) -> bool:
        return self._dispatcher.is_alive()

    def crashed(self) -> bool:
        """The reader thread died of a bug (not a source problem: those reconnect)."""
        return not self.reader.is_alive() and self.reader.state is CameraState.FAILED

    def finished(self) -> bool:
        """The source ended (file without loop) and every buffered frame was dispatched."""
        return not self.reader.is_alive() and len(self.buffer) == 0

    def stop(self, timeout_s: float = 4.0) -> None:
        self.reader.stop(timeout_s)
        self._stop.set()
        self.buffer.close()
        self._dispatcher.join(timeout=timeout_s)
        for _ in self.buffer.drain():
            self.stats.frame_dropped_at_camera(self.cfg.id, DropReason.SHUTDOWN)
        if self.reader.is_alive():
            log.warning("camera %s: reader did not stop within %.1f s", self.cfg.id, timeout_s)
        self.stats.camera_state(self.cfg.id, "stopped")

    def _on_buffer_drop(self, _frame: Frame) -> None:
        self.stats.frame_dropped_at_camera(self.cfg.id, DropReason.BUFFER_FULL)

    def _dispatch(self) -> None:
        while not self._stop.is_set():
            frame = self.buffer.get(timeout=0.2)
            if frame is None:
                continue
            view = FrameView(frame)
            for query in self.queries:
                try:
                    query.submit(view)
                except Exception:  # one query's bug must not starve the others, nor lose the frame
                    log.exception("query %s failed on %s", query.query_id, frame.frame_id)
                    self.stats.record(query.qstats, Outcome.DROPPED, reason=DropReason.ERROR)
