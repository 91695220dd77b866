"""The daemon under a memory budget: models time-share it through the swap scheduler (CPU accounting)."""
from __future__ import annotations

import pytest
import yaml

from edgeva.config import ConfigError, load_config
from edgeva.daemon import Daemon
from edgeva.systemd import Notifier
from tests.conftest import write_test_clip


def _config(tmp_path, budget_mb: float):
    clip = write_test_clip(tmp_path / "c.mp4", frames=30, fps=15, size=(96, 96))
    p = tmp_path / "edgeva.yaml"
    p.write_text(yaml.safe_dump({
        "cameras": [{"id": "c1", "source": str(clip), "loop": True}, {"id": "c2", "source": str(clip), "loop": True}],
        "queries": [
            {"id": "small", "camera": "c1", "model": "mobilenet_v3_small", "task": {"type": "classify"},
             "filter": {"enabled": False}, "sla": {"latency_ms": 2000, "fps": 4}},
            {"id": "big", "camera": "c2", "model": "resnet18", "task": {"type": "classify"},
             "filter": {"enabled": False}, "sla": {"latency_ms": 2000, "fps": 4}}],
        "gpu": {"device": "cpu", "memory_budget_mb": budget_mb, "simulated_bandwidth_gbps": 2.0},
        "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock"}}))
    return load_config(p)


@pytest.mark.slow
def test_models_share_a_budget_smaller_than_their_sum(tmp_path):
    # mobilenet_v3_small ~10 MiB + resnet18 ~45 MiB of weights; 48 MiB holds either, not both.
    daemon = Daemon(_config(tmp_path, 48), notifier=Notifier({}))
    daemon.start()
    daemon.serve(max_runtime_s=8)
    snap = daemon.stats.snapshot()
    memory = snap["memory"]["memory"]
    assert memory["peak_resident_bytes"] <= 48 * 2**20
    assert memory["loads"] > 2 and memory["evictions"] > 0
    for q in ("small", "big"):
        s = snap["queries"][q]
        assert s["inferred"] > 0
        assert s["frames_in"] == s["inferred"] + s["reused"] + s["offloaded"] + s["dropped_total"]


def test_model_larger_than_the_budget_is_refused_at_start(tmp_path):
    daemon = Daemon(_config(tmp_path, 20), notifier=Notifier({}))
    with pytest.raises(ConfigError) as err:
        daemon.start()
    assert err.value.path == "gpu.memory_budget_mb" and "resnet18" in err.value.reason
    assert not daemon.cameras
    daemon.models.stop()
