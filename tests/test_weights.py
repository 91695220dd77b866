"""Real weights when fetched, random weights said out loud when not (issue: the demo's answers
meant nothing and nothing said so)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from edgeva.config import load_config
from edgeva.daemon import Daemon
from edgeva.models import build_model
from edgeva.stats import format_table
from edgeva.systemd import Notifier

REPO = Path(__file__).resolve().parents[1]


def test_fetch_weights_offline_fails_per_model_and_leaves_no_partial_files(tmp_path):
    out = tmp_path / "weights"
    unreachable = "http://127.0.0.1:9"          # whatever this machine's network, the download fails
    env = dict(os.environ, HTTPS_PROXY=unreachable, HTTP_PROXY=unreachable, https_proxy=unreachable,
               http_proxy=unreachable, TORCH_HOME=str(tmp_path / "torch"), YOLO_CONFIG_DIR=str(tmp_path / "yolo"))
    result = subprocess.run([sys.executable, str(REPO / "tools" / "fetch_weights.py"), "--out", str(out)],
                            capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 1
    assert "yolov8n: not fetched" in result.stderr and "mobilenet_v3_small: not fetched" in result.stderr
    assert not out.exists() or list(out.iterdir()) == []


def _demo_like(tmp_path: Path, clip: Path) -> Path:
    cfg = tmp_path / "demo.yaml"
    cfg.write_text(yaml.safe_dump({
        "weights_dir": "weights",
        "cameras": [{"id": "demo", "source": str(clip), "loop": True}],
        "queries": [{"id": "scene", "camera": "demo", "model": "mobilenet_v3_small", "task": {"type": "classify"},
                     "filter": {"enabled": False}}],
        "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock"}}))
    return cfg


def _started(cfg: Path):
    daemon = Daemon(load_config(cfg), notifier=Notifier({}))
    daemon.start()
    return daemon


def test_without_fetched_weights_the_daemon_warns_and_stats_say_random_init(tmp_path, small_clip, caplog):
    cfg = _demo_like(tmp_path, small_clip)
    assert load_config(cfg).queries[0].weights is None
    with caplog.at_level(logging.WARNING, logger="edgeva.daemon"):
        daemon = _started(cfg)
    try:
        snap = daemon.stats.snapshot()
    finally:
        daemon.request_stop()
        daemon.serve()
    assert "WARNING: query scene runs mobilenet_v3_small with RANDOM WEIGHTS" in caplog.text
    assert snap["queries"]["scene"]["weights"] == "random init"
    assert "weights: random init" in format_table(snap)


def test_fetched_weights_in_weights_dir_are_used(tmp_path, small_clip, caplog):
    (tmp_path / "weights").mkdir()
    model = build_model("mobilenet_v3_small")
    saved = tmp_path / "weights" / "mobilenet_v3_small.pth"
    torch.save({"state_dict": model.module.state_dict(), "class_names": list(model.class_names)}, saved)
    cfg = _demo_like(tmp_path, small_clip)
    assert load_config(cfg).queries[0].weights == str(saved.resolve())
    with caplog.at_level(logging.WARNING, logger="edgeva.daemon"):
        daemon = _started(cfg)
    try:
        snap = daemon.stats.snapshot()
    finally:
        daemon.request_stop()
        daemon.serve()
    assert "RANDOM WEIGHTS" not in caplog.text
    assert snap["queries"]["scene"]["weights"] == str(saved.resolve())
    assert "random init" not in format_table(snap)


def test_the_demo_config_looks_for_fetched_weights():
    cfg = load_config(REPO / "configs" / "demo.yaml") if (REPO / "videos" / "demo_street.mp4").exists() else None
    raw = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    assert raw["weights_dir"] == "../weights"
    if cfg is not None:
        fetched = {q.id: q.weights for q in cfg.queries if q.model}
        for query_id, weights in fetched.items():
            assert weights is None or weights.startswith(str((REPO / "weights").resolve()))


def test_check_warns_about_random_weights(tmp_path, small_clip):
    cfg = _demo_like(tmp_path, small_clip)
    out = subprocess.run([sys.executable, "-m", "edgeva", "check", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "WARNING: random weights" in out.stderr and "mobilenet_v3_small@init" in out.stderr
