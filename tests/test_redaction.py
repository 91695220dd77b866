"""Camera credentials never leave the process: stats, the config command, logs, errors."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import yaml

from edgeva.config import ConfigError, load_config
from edgeva.control import ControlError, request
from edgeva.redaction import redact

SECRET = "hunter2-S3cr3t"


def test_redact_hides_passwords_and_secret_parameters():
    assert redact(f"rtsp://admin:{SECRET}@10.0.0.5/s") == "rtsp://admin:***@10.0.0.5/s"
    assert redact(f"rtsp://admin:p@{SECRET}@10.0.0.5:554/s") == "rtsp://admin:***@10.0.0.5:554/s"
    assert redact(f"http://cam/v.cgi?user=a&pwd={SECRET}&res=1") == "http://cam/v.cgi?user=a&pwd=***&res=1"
    assert redact(f"open failed: rtsp://u:{SECRET}@h/x timed out") == "open failed: rtsp://u:***@h/x timed out"
    assert redact("/videos/a:b@c.mp4") == "/videos/a:b@c.mp4"
    assert redact("rtsp://viewer@cam/x") == "rtsp://viewer@cam/x"


def test_config_errors_do_not_echo_the_password(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"cameras": [{"id": "c", "source": f"ftp://u:{SECRET}@h/x"}], "queries": []}))
    try:
        load_config(p)
    except ConfigError as exc:
        assert SECRET not in str(exc) and "cameras[0].source" in str(exc)
    else:
        raise AssertionError("an ftp source must be rejected")


def test_a_running_daemon_never_shows_the_camera_password(tmp_path):
    endpoint = f"ipc://{tmp_path}/ctl.sock"
    source = f"rtsp://admin:{SECRET}@127.0.0.1:9/stream?token={SECRET}"   # nothing listens: it reconnects
    cfg = tmp_path / "edgeva.yaml"
    cfg.write_text(yaml.safe_dump({
        "cameras": [{"id": "door", "source": source, "open_timeout_s": 0.5, "read_timeout_s": 0.5,
                     "reconnect": {"initial_s": 0.1, "max_s": 0.2}}],
        "queries": [{"id": "frames", "camera": "door", "task": {"type": "passthrough"}}],
        "stats": {"endpoint": endpoint, "log_interval_s": 1}}))
    proc = subprocess.Popen([sys.executable, "-m", "edgeva", "run", "--config", str(cfg), "--duration", "6"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        snap = None
        while time.monotonic() < deadline:
            try:
                snap = request(endpoint, {"cmd": "stats"}, timeout_s=1)
                if snap["cameras"]["door"]["reconnects"] >= 1:
                    break
            except ControlError:
                pass
            time.sleep(0.1)
        assert snap is not None and snap["cameras"]["door"]["last_error"]
        shown = json.dumps(snap) + json.dumps(request(endpoint, {"cmd": "config"}))
        cli = subprocess.run([sys.executable, "-m", "edgeva", "stats", "--endpoint", endpoint, "--json"],
                             capture_output=True, text=True, timeout=30)
        assert cli.returncode == 0 and "door" in cli.stdout
        assert "admin:***@127.0.0.1" in snap["cameras"]["door"]["source"]
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "final stats" in err and "reconnecting" in err
    for text in (shown, cli.stdout, out, err):
        assert SECRET not in text
