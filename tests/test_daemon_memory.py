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


@pytest.mark.parametrize("budget_mb", [None, 12])
def test_daemon_runs_a_merged_bundle_with_shared_tensors_counted_once(tmp_path, budget_mb):
    """With a budget the bundle's models are registered from the host (shared tensors once)
    and loaded only by the memory manager."""
    import torch

    from edgeva.memory import unique_bytes
    from edgeva.merging import ModelMeta, analyse_modules, save_bundle
    from edgeva.models import build_model

    paths = []
    for seed in (1, 2):   # two models of one architecture with different weights
        torch.manual_seed(seed)
        m = build_model("mobilenet_v3_small")
        paths.append(tmp_path / f"m{seed}.pt")
        torch.save(m.module.state_dict(), paths[-1])
    keys = [f"mobilenet_v3_small@{p}" for p in paths]
    models = {k: build_model("mobilenet_v3_small", str(p)) for k, p in zip(keys, paths)}
    separate = unique_bytes([m.module for m in models.values()])
    analysis = analyse_modules({k: m.module for k, m in models.items()})
    # Share the convolutions' groups (a real merge would retrain them first; the runtime is what is tested).
    groups = [g for g in analysis.groups if "Conv2d" in g.signature.describe()]
    for g in groups:
        anchor = models[g.members[0].model].module.get_submodule(g.members[0].path)
        for ref in g.members[1:]:
            layer = models[ref.model].module.get_submodule(ref.path)
            for p in g.signature.params:
                setattr(layer, p.name, getattr(anchor, p.name))
    expected = sum(g.bytes_saved for g in groups)
    bundle = save_bundle(tmp_path / "bundle.pt", {k: m.module for k, m in models.items()}, groups,
                         {k: ModelMeta("mobilenet_v3_small", str(p), "classifier") for k, p in zip(keys, paths)})

    clip = write_test_clip(tmp_path / "c.mp4", frames=20, fps=20, size=(96, 96))
    cfg_path = tmp_path / "edgeva.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "cameras": [{"id": "c", "source": str(clip), "loop": True}],
        "queries": [{"id": f"q{i}", "camera": "c", "model": "mobilenet_v3_small", "weights": str(p),
                     "task": {"type": "classify"}, "filter": {"enabled": False}, "sla": {"fps": 5}}
                    for i, p in enumerate(paths)],
        "merging": {"bundle": str(bundle)},
        "gpu": {"device": "cpu", **({"memory_budget_mb": budget_mb} if budget_mb else {})},
        "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock"}}))
    daemon = Daemon(load_config(cfg_path), notifier=Notifier({}))
    daemon.start()
    try:
        memory = daemon.stats.snapshot()["memory"]
        if budget_mb is None:
            resident = memory["resident_bytes"]
            assert expected > 2**20 and resident == separate - expected   # measured storage bytes, not shapes
        else:
            registered = memory["memory"]["registered_bytes"]
            assert expected > 2**20 and registered == separate - expected
            assert separate - expected > budget_mb * 2**20 >= memory["memory"]["peak_resident_bytes"]
        daemon.serve(max_runtime_s=3)
    finally:
        daemon.request_stop()
    snap = daemon.stats.snapshot()
    assert snap["queries"]["q0"]["inferred"] > 0 and snap["queries"]["q1"]["inferred"] > 0


def test_reload_with_a_budget_too_small_is_rejected_and_keeps_running(tmp_path):
    cfg = _config(tmp_path, 48)
    daemon = Daemon(cfg, notifier=Notifier({}))
    daemon.start()
    try:
        raw = yaml.safe_load(open(cfg.source_path))
        raw["gpu"]["memory_budget_mb"] = 20      # resnet18 alone needs ~45 MiB
        with open(cfg.source_path, "w") as f:
            yaml.safe_dump(raw, f)
        cameras = dict(daemon.cameras)
        assert not daemon.reload() and daemon.reload_errors == 1
        assert daemon.cameras == cameras and all(p.alive() for p in cameras.values())
        assert daemon.models.scheduler is not None
    finally:
        daemon.request_stop()
        daemon.serve()
