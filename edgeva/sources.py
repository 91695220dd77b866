"""Camera sources: one reader thread per camera feeding a bounded FrameBuffer.

A source is a video file (replayed in real time or as fast as the pipeline takes it),
a folder of recordings played in name order, a network stream read through OpenCV's FFmpeg
backend, or a local USB/V4L2 device. Readers never raise out of their thread: open and read
failures become the ``reconnecting`` state with exponential back-off (a recording in a
folder that cannot be read is skipped), so one broken camera never affects the others.

Over 400 lines because the buffer, the pacing clock and the reader's state machine are one
hand-off protocol (who counts a frame, who drops it, when a put may block); split apart,
each piece would need the others' invariants restated.
"""
from __future__ import annotations

import enum
import logging
import math
import os
import random
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

import cv2
import numpy as np

from edgeva.config import Backoff, CameraConfig
from edgeva.messages import DropReason, Frame
from edgeva.recordings import frame_count, list_recordings
from edgeva.source_kind import SourceKind, classify_source, redact, usb_index
from edgeva.stats import StatsRegistry

log = logging.getLogger("edgeva.sources")

# Realtime replay that falls further behind than this restarts its schedule instead of
# bursting the backlog into the pipeline (e.g. after the process was suspended).
MAX_REPLAY_LAG_S = 1.0
# How often a reader blocked on a full buffer (replay: fast) re-checks for stop().
STOP_POLL_S = 0.1
# Above this the container's frame rate is junk (some muxers report 90000).
MAX_PLAUSIBLE_FPS = 1000.0


class CameraState(str, enum.Enum):
    STARTING = "starting"
    STREAMING = "streaming"
    RECONNECTING = "reconnecting"
    ENDED = "ended"
    STOPPED = "stopped"
    FAILED = "failed"


# ----------------------------------------------------------------- buffer

class FrameBuffer:
    """Bounded hand-off between one reader and the pipeline.

    Non-blocking put drops the oldest frame when full and reports it through
    `on_drop`; blocking put waits for room. After close(), put refuses frames and
    get() hands out what is left without waiting.
    """

    def __init__(self, capacity: int, on_drop: Callable[[Frame], None] | None = None):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._on_drop = on_drop
        self._frames: deque[Frame] = deque()
        self._closed = False
        self._cond = threading.Condition()

    def put(self, frame: Frame, block: bool = False, timeout: float | None = None) -> bool:
        """Add a frame; False when the buffer is closed or a blocking put timed out."""
        dropped: Frame | None = None
        with self._cond:
            if block:
                deadline = None if timeout is None else time.monotonic() + timeout
                while len(self._frames) >= self.capacity and not self._closed:
                    wait = None if deadline is None else deadline - time.monotonic()
                    if wait is not None and wait <= 0:
                        return False
                    self._cond.wait(wait)
            if self._closed:
                return False
            if len(self._frames) >= self.capacity:
                dropped = self._frames.popleft()
            self._frames.append(frame)
            self._cond.notify_all()
        # Outside the lock: the callback takes the stats lock.
        if dropped is not None and self._on_drop is not None:
            self._on_drop(dropped)
        return True

    def get(self, timeout: float | None = None) -> Frame | None:
        """The oldest frame, or None after `timeout` seconds (at once when closed and empty)."""
        with self._cond:
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._frames and not self._closed:
                wait = None if deadline is None else deadline - time.monotonic()
                if wait is not None and wait <= 0:
                    return None
                self._cond.wait(wait)
            if not self._frames:
                return None
            frame = self._frames.popleft()
            self._cond.notify_all()
            return frame

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[Frame]:
        """Remove and return every frame still held."""
        with self._cond:
            left = list(self._frames)
            self._frames.clear()
            self._cond.notify_all()
            return left

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        with self._cond:
            return len(self._frames)


# ----------------------------------------------------------------- reader helpers

@dataclass
class BackoffTimer:
    """Exponential back-off delays from a `Backoff` config; reset() after a good frame."""

    policy: Backoff
    failures: int = 0

    def next_delay(self) -> float:
        p = self.policy
        base = min(p.max_s, p.initial_s * p.multiplier ** min(self.failures, 64))
        self.failures += 1
        return max(0.0, base * (1.0 + random.uniform(-p.jitter, p.jitter)))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class ReplayClock:
    """Paces frame n at t0 + n/fps on the monotonic clock, so sleep errors don't add up."""

    fps: float
    t0: float | None = None
    n: int = 0

    def wait_turn(self, stop: threading.Event) -> bool:
        """Sleep until the next frame is due; False if stopped meanwhile."""
        now = time.monotonic()
        if self.t0 is None or now - self._due() > MAX_REPLAY_LAG_S:
            self.t0, self.n = now, 0
        delay = self._due() - now
        self.n += 1
        return delay <= 0 or not stop.wait(delay)

    def _due(self) -> float:
        assert self.t0 is not None
        return self.t0 + self.n / self.fps


class _Outcome(enum.Enum):
    EOF = "eof"          # a file ran out of frames
    LOST = "lost"        # open or read failed: back off and retry
    STOPPED = "stopped"  # stop() was called or the buffer was closed


# ----------------------------------------------------------------- reader

class CameraReader(threading.Thread):
    """Reads one camera into its FrameBuffer until stopped; see the module docstring."""

    DEFAULT_REPLAY_FPS = 25.0

    def __init__(self, cfg: CameraConfig, buffer: FrameBuffer, stats: StatsRegistry,
                 on_undelivered: Callable[[Frame, DropReason], None] | None = None):
        """`on_undelivered` buckets a frame counted as delivered that the buffer refused (we are
        stopping); by default the stats registry buckets it for every query of the camera."""
        super().__init__(name=f"camera-{cfg.id}", daemon=True)
        self._on_undelivered = on_undelivered or (
            lambda frame, reason: stats.frame_dropped_at_camera(frame.camera, reason, frame.seq))
        self.kind = classify_source(cfg.source)
        self.cfg = cfg
        self.camera = cfg.id
        self.buffer = buffer
        self.stats = stats
        self.fps: Optional[float] = cfg.fps   # nominal; the container's rate once opened
        self.frames_read = 0
        self.state: CameraState | None = None
        self.decoder: Any = None               # DecoderChoice of the last open
        self._seq = 0
        self._stop_event = threading.Event()
        self._backoff = BackoffTimer(cfg.reconnect)
        self._replay: ReplayClock | None = None
        self._announced_streaming = False
        # A folder source plays its recordings in name order (one file: a playlist of one).
        self.folder = self.kind is SourceKind.FILE and os.path.isdir(self._file_path())
        self.clips: list[str] = []
        self.clip_index = 0
        self.clips_skipped = 0
        self.frames_total: Optional[int] = None   # of the whole playlist (files only; None: unknown)
        self._frame_in_clip = 0
        self._pass_start_frames = 0

    # -- control
    def request_stop(self) -> None:
        """Ask the thread to end without waiting (stop several cameras in parallel)."""
        self._stop_event.set()

    def stop(self, timeout: float = 4.0) -> bool:
        """Stop and wait up to `timeout` s; True if the thread ended.

        A read blocked inside FFmpeg cannot be interrupted; it returns within the
        configured read/open timeout, and the thread then exits without delivering.
        """
        self.request_stop()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)
        if self.is_alive():
            self._report(CameraState.STOPPED)
            return False
        return True

    @property
    def stopped(self) -> bool:
        return self._stop_event.is_set()

    # -- thread body
    def run(self) -> None:
        self._report(CameraState.STARTING)
        try:
            final = self._read_until_done()
        except Exception as exc:  # a bug here must not take the daemon or other cameras down
            log.exception("camera %s: reader crashed", self.camera)
            self._report(CameraState.FAILED, f"{type(exc).__name__}: {exc}")
            return
        self._report(final)

    def _read_until_done(self) -> CameraState:
        if self.kind is SourceKind.FILE:
            self._load_playlist()
        while not self._stop_event.is_set():
            cap, error = self._open()
            outcome = _Outcome.LOST
            if cap is not None:
                try:
                    outcome, error = self._pump(cap)
                finally:
                    cap.release()
            if outcome is _Outcome.STOPPED:
                break
            if outcome is _Outcome.LOST and self.folder and self.clips:
                # One unreadable recording must not stall a folder: skip it.
                log.warning("camera %s: skipping %s: %s", self.camera, self.clips[self.clip_index], error)
                self.clips_skipped += 1
                outcome = _Outcome.EOF
            if outcome is _Outcome.EOF:
                if self._next_clip():
                    continue
                if not self.cfg.loop:
                    return CameraState.ENDED
                if self.frames_read == self._pass_start_frames:   # a whole pass gave nothing: wait
                    self._back_off(error or "no frames decoded")
                self._load_playlist()
                continue
            self._back_off(error)
            if self.folder:
                self._load_playlist()   # the folder may have been filled meanwhile
        return CameraState.STOPPED

    def _file_path(self) -> str:
        source = self.cfg.source.strip()
        return source[len("file://"):] if source.lower().startswith("file://") else source

    def _load_playlist(self) -> None:
        """The files to play (again from the first); their frame count for progress and ETA."""
        path = self._file_path()
        self.clips = list_recordings(path) if self.folder and os.path.isdir(path) else [path]
        self.clip_index = 0
        self._pass_start_frames = self.frames_read
        if self.frames_total is None:
            counts = [frame_count(c) for c in self.clips]
            self.frames_total = None if None in counts else sum(c for c in counts if c is not None)

    def _next_clip(self) -> bool:
        """Move on to the folder's next recording; False after the last one."""
        if self.folder and self.clip_index + 1 < len(self.clips):
            self.clip_index += 1
            return True
        return False

    def _open(self) -> tuple[cv2.VideoCapture | None, str]:
        from edgeva.decode import open_capture

        source = self.cfg.source.strip()
        if self.kind is SourceKind.FILE:
            if self.folder and not self.clips:
                return None, f"no video files in {source}"
            path = self.clips[self.clip_index] if self.clips else self._file_path()
            if not os.path.isfile(path):
                return None, f"file not found: {path}"
            source = path

            def open_opencv() -> cv2.VideoCapture:
                return cv2.VideoCapture(path, cv2.CAP_FFMPEG)
        elif self.kind is SourceKind.STREAM:
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(self.cfg.open_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(self.cfg.read_timeout_s * 1000)]

            def open_opencv() -> cv2.VideoCapture:
                return cv2.VideoCapture(source, cv2.CAP_FFMPEG, params)
        else:
            api = cv2.CAP_V4L2 if sys.platform.startswith("linux") else cv2.CAP_ANY
            index = usb_index(source)

            def open_opencv() -> cv2.VideoCapture:
                return cv2.VideoCapture(index if index is not None else source, api)
        cap, self.decoder = open_capture(source, self.kind.value, self.cfg.decode, open_opencv, camera=self.camera)
        if not cap.isOpened():
            cap.release()
            return None, f"cannot open {self.kind.value} {redact(source)}"
        fps = cap.get(cv2.CAP_PROP_FPS)
        if self.cfg.fps is None and math.isfinite(fps) and 0 < fps <= MAX_PLAUSIBLE_FPS:
            self.fps = fps
        return cap, ""

    def _pump(self, cap: cv2.VideoCapture) -> tuple[_Outcome, str]:
        """Read and deliver frames from an open capture until it ends, fails or we stop."""
        is_file = self.kind is SourceKind.FILE
        clock = self._replay_clock() if is_file and self.cfg.replay == "realtime" else None
        blocking = is_file and self.cfg.replay == "fast"
        frames_this_open = 0
        self._frame_in_clip = 0
        while not self._stop_event.is_set():
            ok, image = cap.read()
            if self._stop_event.is_set():
                break
            if not ok or image is None:
                if is_file and frames_this_open > 0:
                    return _Outcome.EOF, ""
                what = "no frames decoded" if is_file else "stream read failed or timed out"
                return _Outcome.LOST, f"{what}: {redact(self.cfg.source)}"
            frames_this_open += 1
            self.frames_read += 1
            if clock is not None and not clock.wait_turn(self._stop_event):
                break
            if not self._deliver(self._make_frame(image), blocking):
                break
            self._frame_in_clip += 1
            self._backoff.reset()
            if not self._announced_streaming:
                self._announced_streaming = True
                self._report(CameraState.STREAMING)
        return _Outcome.STOPPED, ""

    def _replay_clock(self) -> ReplayClock:
        """The pacing schedule, kept across loop restarts so it does not drift at each wrap."""
        fps = self.fps
        if fps is None:
            fps = self.DEFAULT_REPLAY_FPS
            log.warning("camera %s: file has no frame rate, replaying at %.0f fps (set fps: to override)",
                        self.camera, fps)
            self.fps = fps
        if self._replay is None or self._replay.fps != fps:
            self._replay = ReplayClock(fps)
        return self._replay

    def _make_frame(self, image: np.ndarray) -> Frame:
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if self.cfg.resize is not None:
            width, height = self.cfg.resize
            if image.shape[1] != width or image.shape[0] != height:
                image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        t_media = clip = None
        if self.kind is SourceKind.FILE:
            t_media = self._frame_in_clip / (self.fps or self.DEFAULT_REPLAY_FPS)
            if self.folder and self.clips:
                clip = os.path.basename(self.clips[self.clip_index])
        frame = Frame(camera=self.camera, seq=self._seq, t_capture=time.time(),
                      t_mono=time.monotonic(), image=image, t_media=t_media, clip=clip)
        self._seq += 1
        return frame

    def _deliver(self, frame: Frame, blocking: bool) -> bool:
        """Count the frame and hand it over; False (counted as a shutdown drop) if we must stop."""
        self.stats.frame_delivered(self.camera, frame.seq)
        if blocking:
            while not self.buffer.put(frame, block=True, timeout=STOP_POLL_S):
                if self.buffer.closed or self._stop_event.is_set():
                    break
            else:
                return True
        elif self.buffer.put(frame):
            return True
        self._on_undelivered(frame, DropReason.SHUTDOWN)
        return False

    def _back_off(self, error: str) -> None:
        if self._stop_event.is_set():
            return
        self._report(CameraState.RECONNECTING, error)
        self._announced_streaming = False
        self._replay = None
        self._stop_event.wait(self._backoff.next_delay())

    def _report(self, state: CameraState, error: str | None = None) -> None:
        previous, self.state = self.state, state
        self.stats.camera_state(self.camera, state.value, error)
        if state is previous:
            log.debug("camera %s: still %s (%s)", self.camera, state.value, error)
        elif state is CameraState.RECONNECTING:
            log.warning("camera %s: %s; reconnecting with back-off", self.camera, error)
        elif state is CameraState.STREAMING and previous is CameraState.RECONNECTING:
            log.info("camera %s: reconnected", self.camera)
        elif state is CameraState.STARTING:
            log.info("camera %s: starting %s source %s", self.camera, self.kind.value, redact(self.cfg.source))
        elif state is not CameraState.FAILED:
            log.info("camera %s: %s", self.camera, state.value)
