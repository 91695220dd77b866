"""tools/fetch_videos.py fails offline with one clear line, never a traceback (no outside traffic)."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_gives_a_clear_message(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "fetch_videos.py"), "--out", str(tmp_path),
         "--only", "virat_s_000101", "--virat-server", f"http://127.0.0.1:{_closed_port()}", "--timeout", "3"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "cannot reach 127.0.0.1" in proc.stderr and "needs internet access" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.iterdir())


def test_missing_ytdlp_is_named(tmp_path):
    env = {"PATH": str(tmp_path), "HOME": str(tmp_path)}  # no yt-dlp on this PATH
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "fetch_videos.py"), "--out", str(tmp_path / "v"),
                           "--only", "yt_highway"], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 1
    assert "yt-dlp is not installed" in proc.stderr and "Traceback" not in proc.stderr
