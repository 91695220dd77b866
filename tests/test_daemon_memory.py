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


def _merged_bundle(tmp_path, input_size: int = 96, residual: bool = False):
    """Two mobilenet_v3_small weights files and a bundle sharing their convolutions, recorded as
    checked at `input_size` (a real merge would retrain first; the runtime is what is tested).
    `residual`: the second model's convolutions are the first's plus an int8 residual instead."""
    import torch

    from edgeva.memory import unique_bytes
    from edgeva.merging import ModelMeta, analyse_modules, save_bundle
    from edgeva.merging.residual import attach
    from edgeva.merging.workload import file_digest
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
    groups = [g for g in analysis.groups if "Conv2d" in g.signature.describe()]
    for g in groups:
        anchor = models[g.members[0].model].module.get_submodule(g.members[0].path)
        for ref in g.members[1:]:
            layer = models[ref.model].module.get_submodule(ref.path)
            if residual:
                attach(layer, anchor.weight)
                continue
            for p in g.signature.params:
                setattr(layer, p.name, getattr(anchor, p.name))
    meta = {k: ModelMeta("mobilenet_v3_small", str(p), "classifier", input_size=input_size,
                         weights_digest=file_digest(str(p)), queries=[f"q{i}"])
            for i, (k, p) in enumerate(zip(keys, paths))}
    if residual:
        bundle = save_bundle(tmp_path / "bundle.pt", {k: m.module for k, m in models.items()}, [], meta)
        return bundle, paths, separate, separate - unique_bytes([m.module for m in models.values()])
    bundle = save_bundle(tmp_path / "bundle.pt", {k: m.module for k, m in models.items()}, groups, meta)
    return bundle, paths, separate, sum(g.bytes_saved for g in groups)


def _bundle_config(tmp_path, bundle, paths, input_size=96, budget_mb=None):
    clip = write_test_clip(tmp_path / "c.mp4", frames=20, fps=20, size=(96, 96))
    cfg_path = tmp_path / "edgeva.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "cameras": [{"id": "c", "source": str(clip), "loop": True}],
        "queries": [{"id": f"q{i}", "camera": "c", "model": "mobilenet_v3_small", "weights": str(p),
                     "input_size": input_size, "task": {"type": "classify"}, "filter": {"enabled": False},
                     "sla": {"fps": 5}}
                    for i, p in enumerate(paths)],
        "merging": {"bundle": str(bundle)},
        "gpu": {"device": "cpu", **({"memory_budget_mb": budget_mb} if budget_mb else {})},
        "stats": {"endpoint": f"ipc://{tmp_path}/ctl.sock"}}))
    return load_config(cfg_path)


@pytest.mark.parametrize("budget_mb, residual", [(None, False), (12, False), (None, True), (12, True)])
def test_daemon_runs_a_merged_bundle_with_shared_tensors_counted_once(tmp_path, budget_mb, residual):
    """With a budget the bundle's models are registered from the host (shared tensors once)
    and loaded only by the memory manager. Residual layers count their base once, their int8
    residuals each, and as their dense weight in what the models would hold apart."""
    bundle, paths, separate, expected = _merged_bundle(tmp_path, residual=residual)
    daemon = Daemon(_bundle_config(tmp_path, bundle, paths, budget_mb=budget_mb), notifier=Notifier({}))
    daemon.start()
    try:
        memory = daemon.stats.snapshot()["memory"]
        assert all(m.input_size == 96 for m in daemon.models.models.values())
        if budget_mb is None:
            assert expected > 2**20 and memory["resident_bytes"] == separate - expected   # measured storage bytes
            assert memory["unshared_bytes"] == separate and memory["bytes_saved_by_sharing"] == expected
        else:
            registered = memory["memory"]["registered_bytes"]
            assert expected > 2**20 and registered == separate - expected
            assert separate - expected > budget_mb * 2**20 >= memory["memory"]["peak_resident_bytes"]
        daemon.serve(max_runtime_s=3)
    finally:
        daemon.request_stop()
    snap = daemon.stats.snapshot()
    assert snap["queries"]["q0"]["inferred"] > 0 and snap["queries"]["q1"]["inferred"] > 0


def test_a_bundle_that_does_not_match_the_config_is_refused_naming_the_query(tmp_path):
    from edgeva.pool import ModelPool

    bundle, paths, _, _ = _merged_bundle(tmp_path)

    def build(cfg):
        return ModelPool().plan(cfg)

    assert len(build(_bundle_config(tmp_path, bundle, paths)).models) == 2
    with pytest.raises(ConfigError) as err:           # run at another size than the merge checked
        build(_bundle_config(tmp_path, bundle, paths, input_size=128))
    assert err.value.path == "merging.bundle"
    assert "query 'q0' runs mobilenet_v3_small at 128 px" in err.value.reason and "96 px" in err.value.reason
    with pytest.raises(ConfigError) as err:           # the model's default size (224) is not 96 either
        build(_bundle_config(tmp_path, bundle, paths, input_size=None))
    assert "at 224 px" in err.value.reason
    with pytest.raises(ConfigError) as err:           # another weights file: the bundle's model is unused
        other = tmp_path / "m3.pt"
        other.write_bytes(paths[1].read_bytes())
        build(_bundle_config(tmp_path, bundle, [paths[0], other]))
    assert "no query runs its model mobilenet_v3_small with weights" in err.value.reason and "q1" in err.value.reason
    import torch

    state = torch.load(paths[1], weights_only=True)    # retrained since the merge
    state["classifier.3.bias"] += 1.0
    torch.save(state, paths[1])
    with pytest.raises(ConfigError) as err:
        build(_bundle_config(tmp_path, bundle, paths))
    assert "query 'q1': weights file" in err.value.reason and "changed since the bundle was merged" in err.value.reason


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


def test_a_changed_input_size_builds_a_new_model_and_leaves_the_running_one_alone(tmp_path):
    from edgeva.pool import ModelPool

    bundle, paths, _, _ = _merged_bundle(tmp_path)
    pool = ModelPool()
    cfg = _bundle_config(tmp_path, bundle, paths)
    cfg.merging.bundle = None
    pool.apply(pool.plan(cfg))
    first = dict(pool.models)
    assert {m.input_size for m in first.values()} == {96}
    bigger = _bundle_config(tmp_path, bundle, paths, input_size=128)
    bigger.merging.bundle = None
    plan = pool.plan(bigger)
    assert all(plan.models[k] is not first[k] and plan.models[k].input_size == 128 for k in first)
    assert {m.input_size for m in pool.models.values()} == {96}       # planning changed nothing
    assert pool.plan(cfg).models == first                              # the same size reuses the loaded models
    pool.stop()
