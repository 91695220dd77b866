"""Camera sources against real files, real ffmpeg/GStreamer servers and real OpenCV decoding."""
from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from edgeva.config import Backoff, CameraConfig
from edgeva.messages import DropReason, Frame
from edgeva.source_kind import SourceKind, classify_source, redact
from edgeva.sources import CameraReader, FrameBuffer
from edgeva.stats import StatsRegistry

try:
    from tests.stream_servers import h264_clip, http_server, rtsp_server_proc  # noqa: F401  (fixtures)
except ImportError:  # tests/ run as rootdir-less modules
    from stream_servers import h264_clip, http_server, rtsp_server_proc  # noqa: F401


# ----------------------------------------------------------------- helpers

class RecordingStats(StatsRegistry):
    """A real registry that also remembers every state report with its monotonic time."""

    def __init__(self) -> None:
        super().__init__()
        self.states: list[tuple[float, str, str, str | None]] = []

    def camera_state(self, camera: str, state: str, error: str | None = None) -> None:
        self.states.append((time.monotonic(), camera, state, error))
        super().camera_state(camera, state, error)

    def states_of(self, camera: str) -> list[str]:
        return [s for _, c, s, _ in self.states if c == camera]


def write_clip(path: Path, frames: int, fps: float, size: tuple[int, int] = (160, 120)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert writer.isOpened(), "cv2.VideoWriter cannot write mp4v"
    for i in range(frames):
        image = np.full((size[1], size[0], 3), (i * 7) % 256, np.uint8)
        cv2.putText(image, str(i), (10, size[1] // 2), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2)
        writer.write(image)
    writer.release()
    return path


def make_reader(source: str | Path, stats: StatsRegistry, buffer: int = 8, camera: str = "cam",
                **overrides) -> tuple[CameraReader, FrameBuffer]:
    cfg = CameraConfig(id=camera, source=str(source), buffer=buffer, **overrides)
    stats.add_camera(cfg.id, cfg.source)
    frames = FrameBuffer(cfg.buffer, lambda f: stats.frame_dropped_at_camera(f.camera, DropReason.BUFFER_FULL, f.seq))
    return CameraReader(cfg, frames, stats), frames


def collect(buffer: FrameBuffer, until: Callable[[list[Frame]], bool], timeout_s: float,
            into: list[Frame] | None = None) -> list[Frame]:
    """Take frames from `buffer` until `until(frames)` holds; fail after `timeout_s`."""
    frames = [] if into is None else into
    deadline = time.monotonic() + timeout_s
    while not until(frames):
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout_s} s ({len(frames)} frames taken)")
        frame = buffer.get(timeout=0.05)
        if frame is not None:
            frames.append(frame)
    return frames


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.02)


def frame(seq: int) -> Frame:
    return Frame("cam", seq, time.time(), time.monotonic(), np.zeros((2, 2, 3), np.uint8))


FAST_RETRY = Backoff(initial_s=0.2, max_s=1.0, multiplier=2.0, jitter=0.1)


@pytest.fixture(scope="module")
def short_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clips") / "short.mp4", frames=40, fps=20)


@pytest.fixture
def readers() -> list[CameraReader]:
    """Readers registered here are stopped at teardown even when the test fails."""
    started: list[CameraReader] = []
    yield started
    for reader in started:
        reader.request_stop()
    for reader in started:
        reader.stop(timeout=5)


# ----------------------------------------------------------------- classification

@pytest.mark.parametrize("source, kind", [
    ("clips/a.mp4", SourceKind.FILE), ("/data/cam 1.mkv", SourceKind.FILE),
    ("file:///data/a.mp4", SourceKind.FILE),
    ("rtsp://user:pw@10.0.0.5:554/stream1", SourceKind.STREAM), ("RTSPS://h/x", SourceKind.STREAM),
    ("http://h/live.ts", SourceKind.STREAM), ("https://h/a.m3u8", SourceKind.STREAM),
    ("rtmp://h/app/key", SourceKind.STREAM), ("udp://0.0.0.0:5000", SourceKind.STREAM),
    ("tcp://h:9000", SourceKind.STREAM),
    ("/dev/video0", SourceKind.USB), ("/dev/v4l/by-id/usb-cam-video-index0", SourceKind.USB), ("usb:2", SourceKind.USB), ("0", SourceKind.USB),
])
def test_classify_source(source: str, kind: SourceKind) -> None:
    assert classify_source(source) is kind


def test_unknown_scheme_is_rejected_at_construction() -> None:
    stats = StatsRegistry()
    with pytest.raises(ValueError, match="unsupported source scheme 'ftp'"):
        make_reader("ftp://h/x.mp4", stats)


def test_redact_hides_url_password() -> None:
    assert redact("rtsp://admin:s3cret@10.0.0.5/s") == "rtsp://admin:***@10.0.0.5/s"
    assert redact("/videos/a:b@c.mp4") == "/videos/a:b@c.mp4"


# ----------------------------------------------------------------- FrameBuffer

def test_buffer_drops_oldest_when_full_and_reports_it() -> None:
    dropped: list[int] = []
    buf = FrameBuffer(3, lambda f: dropped.append(f.seq))
    for seq in range(5):
        assert buf.put(frame(seq))
    assert dropped == [0, 1]
    assert [buf.get(0).seq for _ in range(3)] == [2, 3, 4]
    t = time.monotonic()
    assert buf.get(timeout=0.1) is None
    assert time.monotonic() - t >= 0.09


def test_buffer_blocking_put_waits_for_room() -> None:
    buf = FrameBuffer(1, lambda f: pytest.fail("a blocking put must not drop"))
    buf.put(frame(0))
    done = threading.Event()
    threading.Thread(target=lambda: (buf.put(frame(1), block=True), done.set()), daemon=True).start()
    assert not done.wait(0.3)
    assert buf.get(1).seq == 0
    assert done.wait(2)
    assert buf.get(1).seq == 1
    assert buf.put(frame(2), block=True, timeout=0.1)
    assert not buf.put(frame(3), block=True, timeout=0.1)      # full: times out


def test_buffer_close_releases_waiters_and_drain_returns_the_rest() -> None:
    buf = FrameBuffer(2)
    buf.put(frame(0))
    buf.put(frame(1))
    results: list[bool] = []
    putter = threading.Thread(target=lambda: results.append(buf.put(frame(2), block=True)), daemon=True)
    putter.start()
    time.sleep(0.1)
    buf.close()
    putter.join(2)
    assert results == [False]
    assert not buf.put(frame(3))
    assert [f.seq for f in buf.drain()] == [0, 1]
    t = time.monotonic()
    assert buf.get(timeout=5) is None                          # closed and empty: no wait
    assert time.monotonic() - t < 0.5


# ----------------------------------------------------------------- files

def test_fast_replay_delivers_every_frame_then_ends(short_clip: Path, readers: list) -> None:
    stats = RecordingStats()
    reader, buf = make_reader(short_clip, stats, buffer=2, replay="fast", resize=[64, 48])
    readers.append(reader)
    reader.start()

    def slow_take(frames: list[Frame]) -> bool:
        time.sleep(0.005)                    # slower than decoding: the reader must wait, not drop
        return reader.state is not None and reader.state.value == "ended" and len(buf) == 0

    frames = collect(buf, slow_take, timeout_s=20)
    assert [f.seq for f in frames] == list(range(40))
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    cam = stats.cameras["cam"]
    assert (cam.frames_delivered, cam.frames_dropped_buffer) == (40, 0)
    assert stats.states_of("cam") == ["starting", "streaming", "ended"]
    assert reader.fps == pytest.approx(20.0) and reader.frames_read == 40
    reader.join(2)
    assert not reader.is_alive()


def test_loop_restarts_at_eof_with_continuous_seq(tmp_path: Path, readers: list) -> None:
    clip = write_clip(tmp_path / "ten.mp4", frames=10, fps=25)
    stats = RecordingStats()
    reader, buf = make_reader(clip, stats, buffer=4, replay="fast", loop=True)
    readers.append(reader)
    reader.start()
    frames = collect(buf, lambda fs: len(fs) >= 35, timeout_s=20)
    assert [f.seq for f in frames] == list(range(len(frames)))
    # the 11th frame is the clip's first again
    assert np.array_equal(frames[10].image, frames[0].image)
    assert reader.frames_read >= 35
    assert reader.stop()
    assert stats.states_of("cam") == ["starting", "streaming", "stopped"]
    assert stats.cameras["cam"].reconnects == 0


def _paced_count(buf: FrameBuffer, window_s: float) -> tuple[int, float]:
    """Frames captured within `window_s` of the first one, and the worst lag behind schedule."""
    first = buf.get(timeout=10)
    assert first is not None, "no frame within 10 s"
    frames = collect(buf, lambda fs: bool(fs) and fs[-1].t_mono - first.t_mono >= window_s,
                     timeout_s=window_s + 10)
    inside = [first] + [f for f in frames if f.t_mono - first.t_mono < window_s]
    return len(inside), max(f.t_mono - first.t_mono for f in inside)


@pytest.mark.slow
def test_realtime_replay_is_paced_to_file_fps(tmp_path: Path, readers: list) -> None:
    clip = write_clip(tmp_path / "twelve.mp4", frames=300, fps=25, size=(320, 240))
    stats = StatsRegistry()
    reader, buf = make_reader(clip, stats, buffer=8, replay="realtime")
    readers.append(reader)
    reader.start()
    count, span = _paced_count(buf, window_s=10.0)
    print(f"realtime pacing: {count} frames in 10 s at 25 fps (expected 250, "
          f"error {100 * (count - 250) / 250:+.2f}%), last frame at {span:.3f} s")
    assert reader.fps == pytest.approx(25.0)
    assert abs(count - 250) <= 0.05 * 250
    assert stats.cameras["cam"].frames_dropped_buffer == 0


def test_realtime_replay_honours_fps_override(short_clip: Path, readers: list) -> None:
    stats = StatsRegistry()
    reader, buf = make_reader(short_clip, stats, replay="realtime", fps=10.0, loop=True)
    readers.append(reader)
    reader.start()
    count, _ = _paced_count(buf, window_s=2.0)
    assert abs(count - 20) <= 2, f"{count} frames in 2 s at fps 10"
    assert reader.fps == 10.0


def test_missing_file_backs_off_without_affecting_other_cameras(
        tmp_path: Path, short_clip: Path, readers: list) -> None:
    stats = RecordingStats()
    missing = tmp_path / "later.mp4"
    broken, broken_buf = make_reader(missing, stats, camera="broken", replay="fast",
                                     reconnect=Backoff(initial_s=0.1, max_s=0.4, multiplier=2.0, jitter=0.0))
    good, good_buf = make_reader(short_clip, stats, camera="good", buffer=2, replay="fast")
    readers.extend([broken, good])
    broken.start()
    good.start()

    good_frames = collect(good_buf, lambda fs: len(fs) == 40, timeout_s=20)
    assert [f.seq for f in good_frames] == list(range(40))
    wait_for(lambda: stats.states_of("broken").count("reconnecting") >= 5, 10, "5 reconnect attempts")
    wait_for(lambda: stats.cameras["good"].state == "ended", 5, "good camera to end")

    attempts = [t for t, cam, state, _ in stats.states if cam == "broken" and state == "reconnecting"]
    gaps = np.diff(attempts[:5])
    assert gaps[0] >= 0.09 and gaps[1] >= 0.19 and gaps[2] >= 0.38, gaps    # 0.1, 0.2, 0.4...
    assert gaps[3] < 1.5, f"back-off is capped at max_s: {gaps}"
    cam = stats.cameras["broken"]
    assert cam.state == "reconnecting" and "file not found" in (cam.last_error or "")
    assert cam.reconnects >= 5 and cam.frames_delivered == 0
    assert broken.is_alive()

    shutil.copy(short_clip, missing)                # the file shows up: the camera recovers
    frames = collect(broken_buf, lambda fs: len(fs) == 40, timeout_s=20)
    assert [f.seq for f in frames] == list(range(40))
    wait_for(lambda: stats.cameras["broken"].state == "ended", 5, "recovered camera to end")


def test_unexpected_error_in_reader_is_a_failed_state_not_a_crash(short_clip: Path, readers: list) -> None:
    class BrokenStats(RecordingStats):
        def frame_delivered(self, camera: str, seq: int) -> None:
            raise RuntimeError("boom")

    hook_calls: list[object] = []
    previous_hook, threading.excepthook = threading.excepthook, hook_calls.append
    try:
        stats = BrokenStats()
        reader, _ = make_reader(short_clip, stats, replay="fast")
        readers.append(reader)
        reader.start()
        reader.join(5)
    finally:
        threading.excepthook = previous_hook
    assert not reader.is_alive() and not hook_calls
    assert stats.states_of("cam") == ["starting", "failed"]
    assert stats.cameras["cam"].last_error == "RuntimeError: boom"


def test_stop_returns_promptly_while_a_stream_open_blocks(readers: list) -> None:
    # A server that accepts and never sends: FFmpeg blocks until the open timeout.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(server.accept()[0]), daemon=True).start()
    stats = StatsRegistry()
    reader, _ = make_reader(f"tcp://127.0.0.1:{server.getsockname()[1]}", stats,
                            open_timeout_s=20.0, read_timeout_s=20.0)
    readers.append(reader)
    try:
        reader.start()
        wait_for(lambda: bool(accepted), 5, "the reader to connect")
        time.sleep(0.3)
        t = time.monotonic()
        reader.stop()
        assert time.monotonic() - t < 5.0
        assert stats.cameras["cam"].state == "stopped"
    finally:
        for conn in accepted:
            conn.close()
        server.close()
    reader.join(10)                                  # the closed socket unblocks FFmpeg
    assert not reader.is_alive()
    assert stats.cameras["cam"].state == "stopped" and stats.cameras["cam"].reconnects == 0


# ----------------------------------------------------------------- live streams

@pytest.mark.timeout(120)
@pytest.mark.parametrize("server_fixture", ["http_server", "rtsp_server_proc"])
def test_stream_reconnects_after_server_restart(server_fixture: str, request: pytest.FixtureRequest,
                                                readers: list) -> None:
    server, url = request.getfixturevalue(server_fixture)
    stats = RecordingStats()
    reader, buf = make_reader(url, stats, reconnect=FAST_RETRY, open_timeout_s=5.0, read_timeout_s=3.0)
    readers.append(reader)
    reader.start()

    frames = collect(buf, lambda fs: len(fs) >= 10, timeout_s=25)
    assert reader.fps and reader.fps > 0
    assert stats.cameras["cam"].state == "streaming"
    reconnects_before = stats.cameras["cam"].reconnects

    server.kill()
    collect(buf, lambda fs: stats.cameras["cam"].state == "reconnecting", timeout_s=10, into=frames)
    last_seq = frames[-1].seq
    server.start()
    collect(buf, lambda fs: sum(f.seq > last_seq for f in fs) >= 10, timeout_s=30, into=frames)

    seqs = [f.seq for f in frames]
    assert seqs == sorted(set(seqs)), "seq must increase across reconnects"
    assert stats.cameras["cam"].state == "streaming"
    assert stats.cameras["cam"].reconnects > reconnects_before
    assert all(f.image.ndim == 3 and f.image.shape[2] == 3 for f in frames)
    t = time.monotonic()
    assert reader.stop()
    assert time.monotonic() - t < 5.0
    assert stats.cameras["cam"].state == "stopped"
