"""The daemon as a service: readiness, stats over the control socket, reload, stop, accounting."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from edgeva.config import load_config
from edgeva.control import request
from edgeva.daemon import Daemon
from edgeva.messages import DropReason, Outcome
from edgeva.systemd import Notifier
from tests.conftest import wait_until, write_test_clip


def _config(tmp_path: Path, cameras: list[dict], queries: list[dict]) -> Path:
    p = tmp_path / "edgeva.yaml"
    p.write_text(yaml.safe_dump({"cameras": cameras, "queries": queries,
                                 "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock", "log_interval_s": 1}}))
    return p


def _recv_notify(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.splitlines())


def _notify_until(sock: socket.socket, key: str, timeout: float = 20.0) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        fields = _recv_notify(sock)
        if key in fields:
            return fields
    raise AssertionError(f"no {key} notification")


def _unit_stop_timeout_s() -> float:
    """TimeoutStopSec of the shipped unit: how long systemd lets the daemon stop."""
    unit = (Path(__file__).resolve().parents[1] / "systemd" / "edgeva.service").read_text()
    return float(re.search(r"^TimeoutStopSec=(\d+)", unit, re.M).group(1))


@pytest.mark.slow
def test_service_lifecycle_ready_stats_reload_stop(tmp_path):
    a = write_test_clip(tmp_path / "a.mp4", frames=60, fps=20)
    b = write_test_clip(tmp_path / "b.mp4", frames=40, fps=20)
    cam_a = {"id": "cam-a", "source": str(a), "loop": True}
    q_a = {"id": "qa", "camera": "cam-a", "task": {"type": "passthrough"}}
    cfg_path = _config(tmp_path, [cam_a], [q_a])
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="1000000")
    proc = subprocess.Popen([sys.executable, "-m", "edgeva", "run", "--config", str(cfg_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    endpoint = f"ipc://{tmp_path}/ctl.sock"
    try:
        ready = _notify_until(notify, "READY")
        assert ready["MAINPID"] == str(proc.pid)
        _notify_until(notify, "WATCHDOG", timeout=5)
        snap = wait_until(lambda: (s := request(endpoint, {"cmd": "stats"}))["queries"]["qa"]["inferred"] >= 20
                         and s, 20, "frames through qa")
        assert snap["cameras"]["cam-a"]["state"] == "streaming"
        assert request(endpoint, {"cmd": "health"})["status"] == "ok"
        assert request(endpoint, {"cmd": "config"})["cameras"][0]["id"] == "cam-a"

        # The CLI prints the table and the JSON.
        table = subprocess.run([sys.executable, "-m", "edgeva", "stats", "--endpoint", endpoint],
                               capture_output=True, text=True, timeout=30)
        assert table.returncode == 0 and "cam-a" in table.stdout and "p95 ms" in table.stdout
        raw = subprocess.run([sys.executable, "-m", "edgeva", "stats", "--config", str(cfg_path), "--json"],
                             capture_output=True, text=True, timeout=30)
        assert json.loads(raw.stdout)["queries"]["qa"]["frames_in"] > 0

        # SIGHUP with a second camera: cam-a keeps running (its counters keep growing, not reset).
        before = request(endpoint, {"cmd": "stats"})["cameras"]["cam-a"]["frames_delivered"]
        cfg_path.write_text(yaml.safe_dump({
            "cameras": [cam_a, {"id": "cam-b", "source": str(b), "loop": True}],
            "queries": [q_a, {"id": "qb", "camera": "cam-b", "task": {"type": "passthrough"}}],
            "stats": {"endpoint": endpoint, "log_interval_s": 1}}))
        proc.send_signal(signal.SIGHUP)
        _notify_until(notify, "RELOADING")
        snap = wait_until(lambda: (s := request(endpoint, {"cmd": "stats"}))["queries"].get("qb", {}).get(
            "inferred", 0) > 5 and s, 20, "frames through the added camera")
        assert snap["cameras"]["cam-a"]["frames_delivered"] > before
        assert snap["daemon"]["reloads"] == 1

        # A broken config on SIGHUP is rejected and the daemon keeps the running one.
        cfg_path.write_text("cameras: [{id: x}]\n")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: request(endpoint, {"cmd": "stats"})["daemon"]["reload_errors"] == 1, 10, "reload error")
        assert set(request(endpoint, {"cmd": "stats"})["cameras"]) == {"cam-a", "cam-b"}

        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _notify_until(notify, "STOPPING", timeout=5)
        rc = proc.wait(timeout=2 * _unit_stop_timeout_s())
        assert time.monotonic() - t0 < _unit_stop_timeout_s()   # systemd would kill it after that
        assert rc == 0
        err = proc.stderr.read()
        final = json.loads(err.split("final stats ", 1)[1].splitlines()[0])
        for q in final["queries"].values():
            assert q["in_flight"] == 0
            assert q["frames_in"] == q["inferred"] + q["reused"] + q["offloaded"] + q["dropped_total"]
        assert "accounting inconsistent" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


class _SlowQuery:
    """A query that takes a while per frame, so the camera buffer overflows."""

    def __init__(self, query_id: str, stats, delay_s: float, camera: str = "cam"):
        self.query_id = query_id
        self.stats = stats
        self.delay_s = delay_s
        self.qstats = stats.add_query(query_id, camera)

    def submit(self, view) -> None:
        frame = view.frame
        time.sleep(self.delay_s)
        self.stats.record(self.qstats, Outcome.INFERRED, time.monotonic() - frame.t_mono, seq=frame.seq)

    def drop(self, frame, reason) -> None:
        self.stats.record(self.qstats, Outcome.DROPPED, reason=reason, seq=frame.seq)

    def end_of_stream(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_accounting_adds_up_with_buffer_drops(tmp_path):
    clip = write_test_clip(tmp_path / "c.mp4", frames=120, fps=200)
    cfg = load_config(_config(tmp_path, [{"id": "cam", "source": str(clip), "buffer": 2}],
                              [{"id": "q1", "camera": "cam"}, {"id": "q2", "camera": "cam"}]))
    daemon = Daemon(cfg, notifier=Notifier({}))
    daemon._build_query = lambda q, **_: _SlowQuery(q.id, daemon.stats, 0.01)  # type: ignore[method-assign]
    daemon.start()
    daemon.serve(max_runtime_s=30, exit_when_sources_end=True)
    snap = daemon.stats.snapshot()
    assert snap["cameras"]["cam"]["frames_delivered"] == 120
    for q in ("q1", "q2"):
        s = snap["queries"][q]
        assert s["frames_in"] == 120
        assert s["dropped"].get(DropReason.BUFFER_FULL.value, 0) > 0
        assert s["inferred"] + s["dropped_total"] == 120 and s["in_flight"] == 0


def test_a_failing_camera_does_not_stop_the_others(tmp_path):
    good = write_test_clip(tmp_path / "good.mp4", frames=40, fps=40)
    cfg = load_config(_config(tmp_path, [
        {"id": "good", "source": str(good), "loop": True},
        {"id": "dead", "source": "http://127.0.0.1:9/none.ts", "open_timeout_s": 0.5, "read_timeout_s": 0.5,
         "reconnect": {"initial_s": 0.1, "max_s": 0.2}}],
        [{"id": "qg", "camera": "good"}, {"id": "qd", "camera": "dead"}]))
    daemon = Daemon(cfg, notifier=Notifier({}))
    daemon.start()
    try:
        wait_until(lambda: daemon.stats.snapshot()["queries"]["qg"]["inferred"] > 40, 20, "good camera frames")
        snap = daemon.stats.snapshot()
        assert snap["cameras"]["dead"]["state"] in ("reconnecting", "starting")
        wait_until(lambda: daemon.stats.snapshot()["cameras"]["dead"]["reconnects"] >= 2, 20, "reconnect attempts")
        assert daemon.health()["status"] == "degraded"
    finally:
        daemon.request_stop()
        daemon.serve()


def test_a_crashed_reader_is_restarted(tmp_path, monkeypatch):
    clip = write_test_clip(tmp_path / "c.mp4", frames=40, fps=40)
    cfg = load_config(_config(tmp_path, [{"id": "cam", "source": str(clip), "loop": True}],
                              [{"id": "q", "camera": "cam"}]))
    daemon = Daemon(cfg, notifier=Notifier({}))
    daemon.RESTART_CHECK_S = 0.2
    from edgeva.sources import CameraReader

    original = CameraReader._make_frame
    calls = {"n": 0}

    def flaky(self, image):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("a bug in the reader")
        return original(self, image)

    monkeypatch.setattr(CameraReader, "_make_frame", flaky)
    daemon.start()
    import threading
    runner = threading.Thread(target=daemon.serve, kwargs={"max_runtime_s": 20}, daemon=True)
    runner.start()
    try:
        wait_until(lambda: daemon.camera_restarts == 1 and daemon.stats.snapshot()["queries"]["q"]["inferred"] > 30,
                  15, "the camera to come back")
    finally:
        daemon.request_stop()
        runner.join(10)
    s = daemon.stats.snapshot()["queries"]["q"]
    assert s["in_flight"] == 0


def test_reload_moving_a_query_between_cameras_keeps_accounting(tmp_path):
    clip = write_test_clip(tmp_path / "c.mp4", frames=40, fps=40)
    cams = [{"id": "cam1", "source": str(clip), "loop": True}, {"id": "cam2", "source": str(clip), "loop": True}]
    cfg_path = _config(tmp_path, cams, [{"id": "q1", "camera": "cam1"}])
    daemon = Daemon(load_config(cfg_path), notifier=Notifier({}))
    daemon._build_query = lambda q, **_: _SlowQuery(q.id, daemon.stats, 0.002, q.camera)  # type: ignore
    daemon.start()
    try:
        wait_until(lambda: daemon.stats.snapshot()["queries"]["q1"]["inferred"] > 20, 15, "frames on cam1")
        _config(tmp_path, cams, [{"id": "q1", "camera": "cam2"}])
        assert daemon.reload()
        wait_until(lambda: daemon.stats.snapshot()["queries"]["q1"]["inferred"] > 20, 15, "frames on cam2")
        assert daemon.stats.snapshot()["queries"]["q1"]["camera"] == "cam2"
    finally:
        daemon.request_stop()
        daemon.serve()
    assert daemon.stats.accounting_errors(stopped=True) == []


def test_reload_with_an_unsupported_source_is_rejected_before_anything_stops(tmp_path):
    clip = write_test_clip(tmp_path / "c.mp4", frames=40, fps=40)
    cam = {"id": "cam", "source": str(clip), "loop": True}
    cfg_path = _config(tmp_path, [cam], [{"id": "q", "camera": "cam"}])
    daemon = Daemon(load_config(cfg_path), notifier=Notifier({}))
    daemon.start()
    try:
        running = daemon.cameras["cam"]
        _config(tmp_path, [{**cam, "source": "ftp://10.0.0.5/cam.mp4"}], [{"id": "q", "camera": "cam"}])
        assert not daemon.reload() and daemon.reload_errors == 1
        assert daemon.cameras["cam"] is running and running.alive()
    finally:
        daemon.request_stop()
        daemon.serve()
