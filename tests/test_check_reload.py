"""`edgeva check`, start-up and reload share one plan-then-apply path: every broken config the
issue lists is refused by check (exit 2), by `run` (exit 2, no traceback) and by a SIGHUP (the
old config keeps running, health stays true); a reload restarts only the cameras it changes;
health is false when something configured does not run or a query only errors."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from edgeva.cli import main as cli_main
from edgeva.config import load_config
from edgeva.daemon import Daemon
from edgeva.health import ErrorWatch
from edgeva.placement import load_hierarchy, solve
from edgeva.systemd import Notifier
from tests.conftest import SHARED, wait_until, write_test_clip

REPO = Path(__file__).resolve().parents[1]
SHARED_EXPORT = SHARED / "weights" / "yolov8n_int8_openvino_model"




@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {"a": write_test_clip(folder / "a.mp4", frames=40, fps=20, size=(96, 96)),
            "b": write_test_clip(folder / "b.mp4", frames=40, fps=20, size=(96, 96))}


def _good(tmp_path: Path, clips: dict[str, Path]) -> dict[str, Any]:
    return {"cameras": [{"id": "a", "source": str(clips["a"]), "loop": True}],
            "queries": [{"id": "scene", "camera": "a", "model": "resnet18", "task": {"type": "classify"},
                         "filter": {"enabled": False}, "sla": {"fps": 5, "latency_ms": 5000}}],
            "tiers": [{"name": "edge1", "endpoint": "tcp://127.0.0.1:1"}],
            "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock"}}


def _garbage_export(folder: Path) -> Path:
    """An OpenVINO export folder with a valid metadata.yaml and random model files."""
    export = folder / "yolov8n_openvino_model"
    export.mkdir(parents=True, exist_ok=True)
    names = {i: f"class{i}" for i in range(80)}
    (export / "metadata.yaml").write_text(yaml.safe_dump({
        "description": "Ultralytics YOLOv8n model trained on coco.yaml", "task": "detect", "batch": 1,
        "imgsz": [640, 640], "stride": 32, "names": names}))
    rng = np.random.default_rng(0)
    (export / "yolov8n.xml").write_bytes(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    (export / "yolov8n.bin").write_bytes(rng.integers(0, 256, 40000, dtype=np.uint8).tobytes())
    return export


def _yolo_split_plan(folder: Path) -> Path:
    """A plan file that cuts yolov8n after model.4 on the camera box (configs/hierarchy.yaml offers it)."""
    plan = solve(load_hierarchy(REPO / "configs" / "hierarchy.yaml"))
    cars = next(a for a in plan.assignments if a.query == "cars-gate")
    cars.head_node, cars.tail_node, cars.split, cars.split_name = "cam-gate", "edge1", 1, "model.4"
    path = folder / "plan.yaml"
    plan.save(path)
    return path


def _broken(name: str, tmp_path: Path, clips: dict[str, Path]) -> tuple[dict[str, Any], str]:
    """A broken variant of the good config, and the key its error must name."""
    cfg = _good(tmp_path, clips)
    query = cfg["queries"][0]
    if name == "unsplittable-split":
        cfg["queries"].append({"id": "cars-gate", "camera": "a", "model": "yolov8n",
                               "task": {"type": "count", "classes": ["car"]}})
        cfg["placement"] = {"plan": str(_yolo_split_plan(tmp_path)), "node": "cam-gate"}
        return cfg, "placement.plan"
    if name == "unsplittable-query-split":
        query.update(model="yolov8n", task={"type": "count", "classes": ["car"]}, placement="edge1",
                     split_at="model.4")
        return cfg, "queries[0].split_at"
    if name == "split-out-of-range":
        query.update(placement="edge1", split_at=99)
        return cfg, "queries[0].split_at"
    if name == "garbage-openvino-export":
        query.update(model="yolov8n", task={"type": "count", "classes": ["class2"]},
                     weights=str(_garbage_export(tmp_path / "garbage")))
        return cfg, "queries[0].weights"
    if name == "truncated-openvino-bin":
        if not SHARED_EXPORT.is_dir():
            pytest.skip("../shared is absent")
        export = tmp_path / "truncated" / SHARED_EXPORT.name
        shutil.copytree(SHARED_EXPORT, export)
        for f in export.iterdir():
            f.chmod(0o644)
        data = (export / "yolov8n.bin").read_bytes()
        (export / "yolov8n.bin").write_bytes(data[: len(data) // 2])
        query.update(model="yolov8n", task={"type": "count", "classes": ["car"]}, weights=str(export))
        return cfg, "queries[0].weights"
    if name == "garbage-tier-key":
        for name_, suffix in (("server_public_key", "edge1.key"), ("client_secret_key", "box.key_secret")):
            key = tmp_path / suffix
            key.write_text("not a certificate\n")
            cfg["tiers"][0][name_] = str(key)
        query["placement"] = "edge1"
        return cfg, "tiers[0].server_public_key"
    if name == "unwritable-sqlite":
        cfg["sinks"] = {"sqlite": "/proc/x.db"}
        return cfg, "sinks.sqlite"
    raise AssertionError(name)


BROKEN = ["unsplittable-split", "unsplittable-query-split", "split-out-of-range", "garbage-openvino-export",
          "truncated-openvino-bin", "garbage-tier-key", "unwritable-sqlite"]


def _edgeva(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeva", *args], capture_output=True, text=True, timeout=180,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.mark.parametrize("name", BROKEN)
def test_check_exits_2_on_every_broken_config(tmp_path, clips, name, capsys):
    """`edgeva check` (the CLI's own entry point, in this process) used to pass all of them."""
    cfg, key = _broken(name, tmp_path, clips)
    path = tmp_path / "edgeva.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        code = cli_main(["check", "--config", str(path)])
    except SystemExit as exc:        # an error the config loader itself finds
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert f"config error at {key}" in err and "Traceback" not in err


def test_check_passes_the_good_config(tmp_path, clips):
    path = tmp_path / "edgeva.yaml"
    path.write_text(yaml.safe_dump(_good(tmp_path, clips)))
    proc = _edgeva("check", "--config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "1 models loaded and run" in proc.stdout


@pytest.mark.slow
def test_run_exits_2_without_a_traceback_on_an_unsplittable_split(tmp_path, clips):
    """It used to exit 1 with a traceback, which systemd restarts in a loop (only 2 stops it)."""
    cfg, _ = _broken("unsplittable-split", tmp_path, clips)
    path = tmp_path / "edgeva.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = _edgeva("run", "--config", str(path), "--duration", "5")
    assert proc.returncode == 2, proc.stderr
    assert "config error at placement.plan" in proc.stderr and "cannot be split" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_sighup_with_each_broken_config_keeps_the_old_one_running_and_healthy(tmp_path, clips):
    path = tmp_path / "edgeva.yaml"
    good = _good(tmp_path, clips)
    path.write_text(yaml.safe_dump(good))
    daemon = Daemon(load_config(path), notifier=Notifier({}))
    previous = {s: signal.getsignal(s) for s in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    daemon.install_signal_handlers()
    server = threading.Thread(target=daemon.serve, daemon=True)
    try:
        daemon.start()
        server.start()
        wait_until(lambda: daemon.health()["status"] == "ok", 30, "a healthy start")
        pipeline = daemon.cameras["a"]
        for name in BROKEN:
            if name == "truncated-openvino-bin" and not SHARED_EXPORT.is_dir():
                continue
            broken, _ = _broken(name, tmp_path, clips)
            path.write_text(yaml.safe_dump(broken))
            errors = daemon.reload_errors
            os.kill(os.getpid(), signal.SIGHUP)
            wait_until(lambda: daemon.reload_errors == errors + 1, 120, f"the {name} reload to be rejected")
            health = daemon.health()
            assert health["status"] == "ok", (name, health)
            assert daemon.cameras["a"] is pipeline and daemon.cfg.queries[0].model == "resnet18", name
            frames = daemon.stats.queries["scene"].frames_in
            wait_until(lambda: daemon.stats.queries["scene"].frames_in > frames, 10, "frames still flowing")
        assert daemon.reloads == 0
    finally:
        daemon.request_stop()
        server.join(30)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_adding_a_query_on_one_camera_does_not_restart_another(tmp_path, clips):
    """Both cameras' queries share resnet18's worker; adding one on b grew its queue, which used
    to replace the worker and so restart camera a's replay from frame 0."""
    path = tmp_path / "edgeva.yaml"
    cfg = _good(tmp_path, clips)
    cfg["cameras"].append({"id": "b", "source": str(clips["b"]), "loop": True})
    cfg["queries"].append({"id": "scene-b", "camera": "b", "model": "resnet18", "task": {"type": "classify"},
                           "filter": {"enabled": False}, "sla": {"fps": 5, "latency_ms": 5000}})
    path.write_text(yaml.safe_dump(cfg))
    daemon = Daemon(load_config(path), notifier=Notifier({}))
    try:
        daemon.start()
        wait_until(lambda: daemon.stats.queries["scene"].frames_in >= 5, 30, "camera a running")
        camera_a, camera_b = daemon.cameras["a"], daemon.cameras["b"]
        worker = daemon.models.port("resnet18@init")
        delivered = daemon.stats.cameras["a"].frames_delivered
        cfg["queries"].append({**cfg["queries"][1], "id": "scene-b2", "queue": 32})
        path.write_text(yaml.safe_dump(cfg))
        assert daemon.reload()
        assert daemon.cameras["a"] is camera_a and daemon.cameras["b"] is not camera_b
        assert daemon.models.port("resnet18@init") is worker and worker.capacity == 16 + 16 + 32
        assert daemon.stats.cameras["a"].frames_delivered >= delivered
        wait_until(lambda: daemon.stats.queries["scene-b2"].frames_in >= 3, 30, "the new query running")
        assert daemon.health()["status"] == "ok"
    finally:
        daemon.request_stop()
        daemon.serve()


class _FailsOnRealFrames:
    """Runs on the start-up probe, then raises on every batch (a model broken in a way only real
    frames show)."""

    name = "resnet18"
    kind = "classifier"
    class_names = ["a", "b"]
    module = None
    device = None

    def __init__(self, real):
        self.real = real

    def predict(self, images):
        if images[0].shape[:2] != (64, 64):
            raise RuntimeError("broken on real frames")
        return self.real.predict(images)


@pytest.mark.slow
def test_health_is_false_and_the_watchdog_starves_when_a_query_only_errors(tmp_path, clips, monkeypatch):
    from edgeva.models import build_model

    real = build_model("resnet18")
    monkeypatch.setattr("edgeva.models.build_model", lambda *a, **k: _FailsOnRealFrames(real))
    path = tmp_path / "edgeva.yaml"
    cfg = _good(tmp_path, clips)
    cfg["queries"][0]["sla"] = {"latency_ms": 5000}
    path.write_text(yaml.safe_dump(cfg))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.2)
    daemon = Daemon(load_config(path), notifier=Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                                                          "WATCHDOG_USEC": "200000"}))
    daemon.errors = ErrorWatch(window_s=1.0, min_frames=5, sample_every_s=0.1)
    server = threading.Thread(target=daemon.serve, daemon=True)
    try:
        daemon.start()
        server.start()
        failing = "query scene drops nearly every frame with error"
        health = wait_until(lambda: next((h for h in [daemon.health()] if failing in h["problems"]), None), 30,
                       "the error watch")
        assert health["status"] == "degraded" and health["cameras"] == {"a": "streaming"}
        time.sleep(0.3)
        while True:                                # drain what was sent before
            try:
                notify.recv(4096)
            except socket.timeout:
                break
        pings = 0
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                pings += b"WATCHDOG=1" in notify.recv(4096)
            except socket.timeout:
                pass
        assert pings == 0                          # systemd would restart it
    finally:
        daemon.request_stop()
        server.join(30)
        notify.close()


def test_health_is_false_when_a_configured_camera_is_not_running(tmp_path, clips):
    """Health used to look only at the cameras still running: with none left it said ok."""
    path = tmp_path / "edgeva.yaml"
    path.write_text(yaml.safe_dump(_good(tmp_path, clips)))
    daemon = Daemon(load_config(path), notifier=Notifier({}))
    try:
        daemon.start()
        wait_until(lambda: daemon.health()["status"] == "ok", 30, "a healthy start")
        daemon.cameras.pop("a").stop()
        health = daemon.health()
        assert health["status"] == "degraded" and "camera a is not running" in health["problems"]
    finally:
        daemon.request_stop()
        daemon.serve()
