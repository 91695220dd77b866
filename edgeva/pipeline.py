"""Per-camera wiring: reader → frame buffer → dispatcher → each query's runtime.

A CameraPipeline owns its reader thread and one dispatcher thread; queries never share
state through it. Accounting: the reader counts a frame as delivered (for every query of
the camera) before buffering it; a frame lost before the queries (buffer overflow:
`buffer-full`; refused or still buffered at stop: `shutdown`) is handed to every query's
`drop`, so each buckets it and emits its `dropped` record; everything dispatched is the
query runtime's to bucket.
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

    def drop(self, frame: Frame, reason: DropReason) -> None:
        """Bucket a frame that never reached `submit` as dropped (and emit its record)."""

    def end_of_stream(self) -> None:
        """The source ended and every frame was submitted: answer whatever is held."""

    def close(self) -> None:
        """The camera stops: bucket whatever is still held (dropped, `shutdown`)."""


class CameraPipeline:
    def __init__(self, cfg: CameraConfig, queries: list[QueryRuntime], stats: StatsRegistry):
        self.cfg = cfg
        self.queries = list(queries)
        self.stats = stats
        stats.add_camera(cfg.id, redact(cfg.source))   # stats are shown: never a password
        self.buffer = FrameBuffer(cfg.buffer, on_drop=lambda frame: self._drop(frame, DropReason.BUFFER_FULL))
        self.reader = CameraReader(cfg, self.buffer, stats, on_undelivered=self._drop)
        self._stop = threading.Event()
        self._scenes: dict = {}      # the camera's background per filter differencer (dispatcher thread only)
        self._dispatcher = threading.Thread(target=self._dispatch, name=f"dispatch-{cfg.id}", daemon=True)

    @property
    def camera_id(self) -> str:
        return self.cfg.id

    def start(self) -> None:
        self._dispatcher.start()
        self.reader.start()

    def query_ids(self) -> list[str]:
        return [q.query_id for q in self.queries]

    def alive(self) -> bool:
        return self._dispatcher.is_alive()

    def crashed(self) -> bool:
        """The reader thread died of a bug (not a source problem: those reconnect)."""
        return not self.reader.is_alive() and self.reader.state is CameraState.FAILED

    def finished(self) -> bool:
        """The source ended (file without loop) and every buffered frame was dispatched."""
        return not self.reader.is_alive() and len(self.buffer) == 0

    def progress(self) -> tuple[int, int | None, int, int]:
        """(frames every query is done with, frames in the recording(s) or None, clip number, clips)."""
        cam = self.stats.cameras.get(self.cfg.id)
        delivered = cam.frames_delivered if cam is not None else 0
        busy = max((q.qstats.in_flight for q in self.queries), default=0)
        reader = self.reader
        return delivered - busy, reader.frames_total, reader.clip_index + 1, max(1, len(reader.clips))

    def stop(self, timeout_s: float = 4.0) -> None:
        self.reader.stop(timeout_s)
        self._stop.set()
        self.buffer.close()
        self._dispatcher.join(timeout=timeout_s)
        for frame in self.buffer.drain():
            self._drop(frame, DropReason.SHUTDOWN)
        for query in self.queries:
            try:
                query.close()
            except Exception:
                log.exception("query %s failed to close", query.query_id)
        if self.reader.is_alive():
            log.warning("camera %s: reader did not stop within %.1f s", self.cfg.id, timeout_s)
        self.stats.camera_state(self.cfg.id, "stopped")

    def _end_of_stream(self) -> None:
        for query in self.queries:
            try:
                query.end_of_stream()
            except Exception:   # the held frames stay in flight; --until-end's stall check ends the run
                log.exception("query %s failed at the end of its source", query.query_id)

    def _drop(self, frame: Frame, reason: DropReason) -> None:
        self.stats.camera_dropped(self.cfg.id, reason)
        for query in self.queries:
            self._drop_for(query, frame, reason)

    def _drop_for(self, query: QueryRuntime, frame: Frame, reason: DropReason) -> None:
        try:
            query.drop(frame, reason)
        except Exception:   # its record is lost, its bucket must not be
            log.exception("query %s failed to drop %s", query.query_id, frame.frame_id)
            self.stats.record(query.qstats, Outcome.DROPPED, reason=reason, seq=frame.seq)

    def _dispatch(self) -> None:
        ended = False
        while not self._stop.is_set():
            frame = self.buffer.get(timeout=0.2)
            if frame is None:
                if not ended and self.finished():
                    ended = True
                    self._end_of_stream()
                continue
            view = FrameView(frame, fps=self.reader.fps, scenes=self._scenes)
            for query in self.queries:
                try:
                    query.submit(view)
                except Exception:  # one query's bug must not starve the others, nor lose the frame
                    log.exception("query %s failed on %s", query.query_id, frame.frame_id)
                    self._drop_for(query, frame, DropReason.ERROR)
