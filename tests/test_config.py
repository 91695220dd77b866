"""Config loading: typed conversion, and errors that name the key path and reason."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edgeva.config import ConfigError, load_config, looks_ahead, parse_config

REPO = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, data) -> Path:
    p = tmp_path / "edgeva.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    p = tmp_path / "cam.mp4"
    p.write_bytes(b"not decoded at load time")
    return p


def _base(clip: Path) -> dict:
    return {"cameras": [{"id": "cam1", "source": clip.name}],
            "queries": [{"id": "q1", "camera": "cam1", "task": {"type": "passthrough"}}]}


def test_valid_config_converts_types_and_resolves_paths(tmp_path, clip):
    cfg = load_config(_write(tmp_path, _base(clip)))
    assert cfg.cameras[0].source == str(clip.resolve())
    assert cfg.cameras[0].replay == "realtime" and cfg.cameras[0].reconnect.max_s == 30.0
    assert cfg.queries[0].task.type == "passthrough"
    assert cfg.gpu.device == "auto"
    assert cfg.queries_for("cam1")[0].id == "q1"


@pytest.mark.parametrize("mutate, path, reason", [
    (lambda c: c.update(camras=[]), "camras", "unknown key"),
    (lambda c: c["cameras"][0].update(replay="slow"), "cameras[0].replay", "must be one of"),
    (lambda c: c["cameras"][0].update(buffer="8"), "cameras[0].buffer", "expected an integer"),
    (lambda c: c["cameras"][0].update(buffer=0), "cameras[0].buffer", ">= 1"),
    (lambda c: c["cameras"][0].pop("source"), "cameras[0].source", "missing required key"),
    (lambda c: c["cameras"][0].update(source="nope.mp4"), "cameras[0].source", "file not found"),
    (lambda c: c["cameras"][0]["reconnect"].__init__(multiplier=0.5) if False else
     c["cameras"][0].update(reconnect={"multiplier": 0.5}), "cameras[0].reconnect.multiplier", ">= 1"),
    (lambda c: c["queries"][0].update(camera="cam9"), "queries[0].camera", "unknown camera 'cam9'"),
    (lambda c: c["queries"][0]["task"].update(type="segment"), "queries[0].task.type", "must be one of"),
    (lambda c: c["queries"][0].update(task={"type": "count", "classes": ["car"]}), "queries[0].model",
     "needs a model"),
    (lambda c: c["queries"][0].update(model="yolov8n", task={"type": "count"}), "queries[0].task.classes",
     "at least one class"),
    (lambda c: c["queries"][0].update(accuracy_target=1.5), "queries[0].accuracy_target", "(0, 1]"),
    (lambda c: c["queries"].append(dict(c["queries"][0])), "queries[1].id", "duplicate id"),
    (lambda c: c.update(gpu={"device": "tpu"}), "gpu.device", "auto, cpu, cuda"),
    (lambda c: c.update(stats={"endpoint": "localhost:5555"}), "stats.endpoint", "not a ZeroMQ endpoint"),
    (lambda c: c.update(queries={"q1": {}}), "queries", "expected a list"),
    (lambda c: c["cameras"][0].update(source="ftp://10.0.0.5/cam.mp4"), "cameras[0].source",
     "unsupported source scheme 'ftp'"),
    (lambda c: c.update(sinks={"flush_s": 0}), "sinks.flush_s", "must be > 0"),
    (lambda c: c.update(stats={"max_request_bytes": -1}), "stats.max_request_bytes", ">= 64"),
    (lambda c: c["queries"][0].update(weights="missing.pt", model="resnet18"), "queries[0].weights",
     "file not found"),
    (lambda c: c["queries"][0].update(filter={"segment_s": 5, "calibration_s": 3}), "queries[0].filter.segment_s",
     "at most calibration_s"),
    (lambda c: c["queries"][0].update(filter={"recalibrate_s": 1}), "queries[0].filter.recalibrate_s",
     "at least calibration_s"),
    (lambda c: c["queries"][0].update(filter={"calibration_s": 0}), "queries[0].filter.calibration_s", "> 0"),
    (lambda c: c["queries"][0].update(filter={"calibration_stride": 0}), "queries[0].filter.calibration_stride",
     ">= 1"),
    (lambda c: c.update(weights_dir="cam.mp4"), "weights_dir", "is a file, not a folder"),
])
def test_bad_config_names_key_and_reason(tmp_path, clip, mutate, path, reason):
    data = _base(clip)
    mutate(data)
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert err.value.path == path
    assert reason in err.value.reason


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=r"not valid YAML \(line \d+, column \d+\)"):
        load_config(_write(tmp_path, "cameras:\n  - id: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        parse_config(["a", "list"])


def test_cli_exits_nonzero_naming_the_key_before_starting(tmp_path, clip):
    data = _base(clip)
    data["queries"][0]["camera"] = "ghost"
    cfg = _write(tmp_path, data)
    for cmd in (["check"], ["run", "--duration", "5"]):
        proc = subprocess.run([sys.executable, "-m", "edgeva", *cmd, "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert "queries[0].camera" in proc.stderr and "unknown camera 'ghost'" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_one_model_runs_at_one_input_size(tmp_path, clip):
    data = _base(clip)
    data["queries"] = [{"id": "a", "camera": "cam1", "model": "resnet18", "task": {"type": "classify"}, "input_size": 224},
                       {"id": "b", "camera": "cam1", "model": "resnet18", "task": {"type": "classify"}, "input_size": 160}]
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert err.value.path == "queries[1].input_size" and "query 'b'" in err.value.reason and "'a'" in err.value.reason
    data["queries"][1]["input_size"] = 224
    assert load_config(_write(tmp_path, data)).queries[1].input_size == 224
    data["queries"][1]["input_size"] = 8
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert err.value.path == "queries[1].input_size"


def test_looking_ahead_needs_a_recording_replayed_fast(tmp_path, clip):
    data = _base(clip)
    data["queries"] = [{"id": "a", "camera": "cam1", "model": "yolov8n", "task": {"type": "count", "classes": ["car"]},
                        "filter": {"look_ahead": True}}]
    data["cameras"] = [{**data["cameras"][0], "replay": "realtime"}]
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert err.value.path == "queries[0].filter.look_ahead" and "replay: fast" in err.value.reason
    data["cameras"][0]["replay"] = "fast"
    assert load_config(_write(tmp_path, data)).queries[0].filter.look_ahead
    data["cameras"][0]["source"] = "rtsp://camera/stream"
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, data))
    assert err.value.path == "queries[0].filter.look_ahead"
    data["cameras"][0]["source"] = f"file://{clip.resolve()}"      # a file URL is a recording, as the daemon reads it
    assert load_config(_write(tmp_path, data)).cameras[0].batch


def test_a_recording_replayed_fast_looks_ahead_unless_configured_not_to_and_a_live_camera_never(tmp_path, clip):
    data = _base(clip)
    data["queries"] = [{"id": "a", "camera": "cam1", "model": "yolov8n", "task": {"type": "count", "classes": ["car"]}}]
    for replay, default in (("fast", True), ("realtime", False)):
        data["cameras"] = [{**data["cameras"][0], "replay": replay}]
        cfg = load_config(_write(tmp_path, data))
        assert cfg.queries[0].filter.look_ahead is None
        assert looks_ahead(cfg.queries[0].filter, cfg.cameras[0]) is default
    data["cameras"][0]["replay"] = "fast"
    data["queries"][0]["filter"] = {"look_ahead": False}
    cfg = load_config(_write(tmp_path, data))
    assert not looks_ahead(cfg.queries[0].filter, cfg.cameras[0])


@pytest.mark.parametrize("name", ["demo.yaml", "example.yaml", "gemel_workload.yaml", "family.yaml",
                                  "detector_family.yaml"])
def test_shipped_configs_are_valid(name):
    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    cfg = parse_config(raw)  # without base_dir: the clips need not exist for this check
    assert cfg.cameras and cfg.queries
