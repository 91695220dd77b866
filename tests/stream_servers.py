"""Local stream servers for source tests: an ffmpeg HTTP/MPEG-TS server and a GStreamer RTSP server.

Import the helpers and fixtures from tests; run as a script (with the system python,
which has `gi`) to serve RTSP:  /usr/bin/python3 tests/stream_servers.py rtsp PORT
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

SYSTEM_PYTHON = "/usr/bin/python3"
RTSP_LAUNCH = ("( videotestsrc is-live=true ! video/x-raw,width={width},height={height},framerate={fps}/1 "
               "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} "
               "! rtph264pay name=pay0 pt=96 )")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout_s: float) -> bool:
    """Poll until something accepts TCP connections on 127.0.0.1:port (not for single-client servers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def ffmpeg_missing() -> str | None:
    return None if shutil.which("ffmpeg") else "ffmpeg is not installed"


@lru_cache(maxsize=1)
def gst_rtsp_missing() -> str | None:
    if not os.path.exists(SYSTEM_PYTHON):
        return f"{SYSTEM_PYTHON} is missing"
    probe = ("import gi; gi.require_version('Gst', '1.0'); gi.require_version('GstRtspServer', '1.0'); "
             "from gi.repository import Gst, GstRtspServer; Gst.init(None); "
             "assert Gst.ElementFactory.find('x264enc') and Gst.ElementFactory.find('videotestsrc')")
    try:
        done = subprocess.run([SYSTEM_PYTHON, "-c", probe], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot probe GStreamer: {exc}"
    return None if done.returncode == 0 else "gi / GstRtspServer / x264enc unavailable to the system python"


def make_h264_clip(path: Path, seconds: float, fps: int = 25, size: str = "320x240") -> Path:
    subprocess.run(["ffmpeg", "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi",
                    "-i", f"testsrc=size={size}:rate={fps}", "-t", str(seconds),
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60)
    return path


class ServerProcess:
    """A child server process that can be killed and started again on the same command line."""

    def __init__(self, argv: Sequence[str], log_path: Path):
        self.argv = list(argv)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "ServerProcess":
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def http_ts_server(clip: Path, port: int, log_path: Path) -> ServerProcess:
    """ffmpeg replaying `clip` in real time as MPEG-TS over HTTP; serves one client per start."""
    return ServerProcess(["ffmpeg", "-nostdin", "-loglevel", "warning", "-re", "-stream_loop", "-1",
                          "-i", str(clip), "-c", "copy", "-f", "mpegts", "-listen", "1",
                          f"http://127.0.0.1:{port}/live.ts"], log_path)


def rtsp_server(port: int, log_path: Path) -> ServerProcess:
    return ServerProcess([SYSTEM_PYTHON, str(Path(__file__).resolve()), "rtsp", str(port)], log_path)


# ----------------------------------------------------------------- fixtures

try:
    import pytest
except ImportError:  # run as a script by the system python
    pytest = None  # type: ignore[assignment]

if pytest is not None:
    @pytest.fixture(scope="session")
    def h264_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
        if reason := ffmpeg_missing():
            pytest.skip(reason)
        return make_h264_clip(tmp_path_factory.mktemp("streams") / "clip.mp4", seconds=4)

    @pytest.fixture
    def http_server(h264_clip: Path, tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
        port = free_port()
        server = http_ts_server(h264_clip, port, tmp_path / "ffmpeg-http.log")
        try:
            yield server.start(), f"http://127.0.0.1:{port}/live.ts"
        finally:
            server.kill()

    @pytest.fixture
    def rtsp_server_proc(tmp_path: Path) -> Iterator[tuple[ServerProcess, str]]:
        if reason := gst_rtsp_missing():
            pytest.skip(reason)
        port = free_port()
        server = rtsp_server(port, tmp_path / "gst-rtsp.log")
        try:
            server.start()
            if not wait_for_port(port, 15):
                pytest.fail(f"RTSP server did not come up: {server.log_text()}")
            yield server, f"rtsp://127.0.0.1:{port}/test"
        finally:
            server.kill()


# ----------------------------------------------------------------- script

def serve_rtsp(port: int, mount: str = "/test", width: int = 320, height: int = 240, fps: int = 15) -> None:
    import gi
    gi.require_version("Gst", "1.0")
    gi.require_version("GstRtspServer", "1.0")
    from gi.repository import GLib, Gst, GstRtspServer

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(RTSP_LAUNCH.format(width=width, height=height, fps=fps))
    factory.set_shared(True)
    server.get_mount_points().add_factory(mount, factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"serving rtsp://127.0.0.1:{port}{mount}", flush=True)
    loop.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kind", choices=["rtsp"])
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    serve_rtsp(args.port)
