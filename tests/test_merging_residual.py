"""Residual layers: a shared base plus an int8 residual per model, after full sharing.

A family of copies of one base, each drifted a little the way fine-tuning moves weights: full
sharing (one tensor, no retraining) changes some answers, a residual layer keeps every answer
and still holds most bytes in common."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgeva.config import TaskConfig
from edgeva.memory import MemoryManager, unique_bytes
from edgeva.merging import (IncrementalMerger, MergeSettings, QuerySpec, Workload, build_report, dense_bytes,
                            load_bundle, resident_weight_bytes, save_bundle)
from edgeva.merging import residual
from edgeva.merging.planner import plan_residuals, residual_back_off
from edgeva.merging.workload import CameraFrames
from edgeva.transfer import SimulatedBackend
from tests.test_merging import one_thread, TinyNet, make_frames, trained_model, two_mobilenet_workload, wrap  # noqa: F401 (autouse fixture)


@pytest.fixture(scope="module")
def camera() -> CameraFrames:
    return CameraFrames(train=make_frames(64, seed=11), heldout=make_frames(96, seed=12))


@pytest.fixture(scope="module")
def base_net(camera) -> TinyNet:
    return trained_model("quadrant", 1, make_frames(384, seed=0)).module


def drifted_family(base: TinyNet, n: int, drift: float) -> dict[str, object]:
    """n copies of `base`, every weight moved by `drift` x its tensor's spread (fine-tuning moves
    the copies of a family 0.1-0.8 % here; `drift` large enough that full sharing flips answers)."""
    models = {}
    for i in range(n):
        net = TinyNet()
        g = torch.Generator().manual_seed(100 + i)
        net.load_state_dict({k: v + drift * v.std() * torch.randn(v.shape, generator=g)
                             if v.is_floating_point() and v.ndim > 1 else v for k, v in base.state_dict().items()})
        models[f"tiny@copy{i}"] = wrap(net.eval())
    return models


def family_workload(models, camera, target: float = 1.0) -> Workload:
    queries = [QuerySpec(f"q{i}", k, "cam", TaskConfig(type="classify"), target) for i, k in enumerate(models)]
    return Workload(models, queries, {"cam": camera}, {k: "tinynet" for k in models})


def top1(model, frames) -> list[int]:
    return [o.top1 for o in model.predict(frames)]


# ---------------------------------------------------------------------- the layer itself

def test_quantised_residual_is_within_half_a_step_of_every_weight():
    torch.manual_seed(0)
    residual_values = torch.randn(16, 8, 3, 3) * torch.logspace(-4, -1, 16).reshape(16, 1, 1, 1)
    residual_values[3] = 0.0                                  # a channel that did not move
    codes, scale = residual.quantise(residual_values)
    assert codes.dtype == torch.int8 and scale.shape == (16, 1, 1, 1)
    error = (codes.float() * scale - residual_values).abs()
    assert torch.all(error <= scale / 2 + 1e-12)
    assert torch.all(codes[3] == 0)


@pytest.mark.parametrize("make", [lambda: nn.Conv2d(4, 8, 3, padding=1), lambda: nn.Linear(12, 5)])
def test_a_residual_layer_computes_its_own_function_and_undoes_exactly(make):
    torch.manual_seed(1)
    base_layer, layer = make(), make()
    with torch.no_grad():
        layer.weight.copy_(base_layer.weight + 0.01 * torch.randn_like(layer.weight))
    x = torch.randn(2, 4, 6, 6) if isinstance(layer, nn.Conv2d) else torch.randn(3, 12)
    own_weight = layer.weight
    with torch.no_grad():
        want = layer(x)
        residual.attach(layer, base_layer.weight)
        got = layer(x)
    assert residual.is_residual(layer) and layer.base is base_layer.weight
    assert "weight" not in dict(layer.named_parameters())
    torch.testing.assert_close(got, want, atol=5e-3, rtol=0)              # half a step of 0.01-scale noise per weight
    assert unique_bytes([layer]) < unique_bytes([make()]) + unique_bytes([base_layer])
    assert dense_bytes(layer) == unique_bytes([make()])  # what it holds as a plain layer
    residual.detach(layer, own_weight)
    assert type(layer) in (nn.Conv2d, nn.Linear) and layer.weight is own_weight
    with torch.no_grad():
        assert torch.equal(layer(x), want)


def test_only_plain_conv2d_and_linear_take_a_residual():
    with pytest.raises(TypeError):
        residual.attach(nn.Conv1d(2, 2, 3), nn.Parameter(torch.zeros(2, 2, 3)))
    with pytest.raises(ValueError):
        residual.attach(nn.Linear(3, 2), nn.Parameter(torch.zeros(3, 2)))


# --------------------------------------------------------------------------- the plan

def test_residual_plan_bases_on_the_fully_shared_part_else_the_first_copy(base_net, camera):
    models = drifted_family(base_net, 3, 0.02)
    merger = IncrementalMerger(family_workload(models, camera), MergeSettings(train_steps=0))
    groups = merger.analysis.groups
    hidden = next(g for g in groups if g.members[0].path == "hidden")
    part = hidden.restricted_to(("tiny@copy1", "tiny@copy2"))
    plan = {r.layer_id: r for r in plan_residuals(groups, [part])}
    on_part = plan[hidden.layer_id]
    assert on_part.base == part.members[0] and [m.model for m in on_part.members] == ["tiny@copy0"]
    head = next(g for g in groups if g.members[0].path == "head")
    alone = plan[head.layer_id]
    assert alone.base.model == "tiny@copy0" and alone.models == ("tiny@copy1", "tiny@copy2")
    weight = next(p for p in head.signature.params if p.name == "weight")
    assert alone.saving_per_member == 4 * 32 * 3 - 4 * 4             # float32 out, int8 + a scale per row in
    assert hidden.layer_id not in {r.layer_id for r in plan_residuals(groups, [hidden])}   # one tensor already
    assert head.layer_id not in {r.layer_id for r in plan_residuals(groups, [], done={head.layer_id})}
    assert weight.shape == (4, 32)
    split = residual_back_off(list(plan.values()), ["tiny@copy1"])
    assert len(split) == 2 and sum(len(s) for s in split) == len(plan)
    single = residual_back_off([alone], ["tiny@copy1"])
    assert [m.model for m in single[0][0].members] == ["tiny@copy2"]
    assert residual_back_off([on_part], ["tiny@copy0"]) == []


# ------------------------------------------------------------------------ the merge

@pytest.fixture(scope="module")
def merged(base_net, camera, tmp_path_factory):
    models = drifted_family(base_net, 3, 0.08)
    originals = {k: top1(m, camera.heldout) for k, m in models.items()}
    out = tmp_path_factory.mktemp("residual")
    merger = IncrementalMerger(family_workload(models, camera),
                               MergeSettings(train_steps=0, residuals="int8"), out_dir=out)
    before = resident_weight_bytes(merger.modules.values())
    state = merger.run()
    return models, originals, merger, state, before, out


def test_layers_full_sharing_changes_are_kept_as_residuals_with_every_answer(merged, camera):
    models, originals, merger, state, before, _ = merged
    full = [a for a in state.attempts if a.origin != "residual"]
    assert any(a.outcome != "accepted" for a in full)                # sharing alone flips answers here
    assert state.residuals and any(a.origin == "residual" and a.outcome == "accepted" for a in state.attempts)
    for key, model in models.items():
        assert top1(model, camera.heldout) == originals[key]        # target 1.0: every answer kept
    saved = before - resident_weight_bytes(merger.modules.values())
    assert saved == state.bytes_saved == merger.memory().bytes_saved > 0
    report = build_report(merger, state, setup_s=0.0)
    assert report["analysed_bytes_saved"] == report["memory"]["bytes_saved"]
    assert len(report["residual_layers"]) == len(state.residuals)
    assert all(q["met"] for q in report["queries"].values())


def test_a_residual_step_that_misses_is_undone_and_halved(base_net, camera, monkeypatch):
    models = drifted_family(base_net, 3, 0.08)
    wl = family_workload(models, camera)
    weights = {k: [p.detach().clone() for p in m.module.parameters()] for k, m in models.items()}
    merger = IncrementalMerger(wl, MergeSettings(train_steps=0, residuals="int8"))
    state = merger.initial_state()
    state.queue.clear()
    monkeypatch.setattr(residual, "DELTA_LEVELS", 1)                # one level: far too coarse to agree
    state = merger.run(state)
    first = state.attempts[0]
    assert first.origin == "residual" and first.outcome == "backed off: residual" and first.failing_queries
    assert all(a.outcome != "accepted" or a.agreement_final for a in state.attempts)
    failed = [a for a in state.attempts if a.outcome != "accepted"]
    assert len(state.attempts) > 1 and failed
    if not state.residuals:                                          # nothing kept: every weight as before
        for k, m in models.items():
            assert all(torch.equal(p, w) for p, w in zip(m.module.parameters(), weights[k]))
    assert merger.memory().bytes_saved == state.bytes_saved


def test_a_bundle_with_residual_layers_loads_shared_and_answers_alike(merged, camera, tmp_path):
    models, _, merger, state, _, _ = merged
    path = save_bundle(tmp_path / "b.pt", merger.modules, state.accepted, merger.meta())
    bundle = load_bundle(path, builder=lambda name, weights, download, device: wrap(TinyNet().eval()))
    assert bundle.resident_bytes() == resident_weight_bytes(merger.modules.values())
    for layer in state.residuals:
        base = bundle.modules[layer.base.model].get_submodule(layer.base.path).weight
        for ref in layer.members:
            loaded = bundle.modules[ref.model].get_submodule(ref.path)
            assert residual.is_residual(loaded) and loaded.base is base
    for key, model in models.items():
        a = np.stack([o.probs for o in model.predict(camera.heldout[:16])])
        b = np.stack([o.probs for o in bundle.models[key].predict(camera.heldout[:16])])
        np.testing.assert_allclose(a, b, atol=1e-6)
        assert dense_bytes(bundle.modules[key]) == unique_bytes([TinyNet()])


def test_a_merge_resumes_with_its_residual_layers(merged, base_net, camera):
    models, _, merger, state, _, out = merged
    again = IncrementalMerger(family_workload(drifted_family(base_net, 3, 0.08), camera),
                              MergeSettings(train_steps=0, residuals="int8"), out_dir=out)
    resumed = again.resume()
    assert [r.to_json() for r in resumed.residuals] == [r.to_json() for r in state.residuals]
    assert resident_weight_bytes(again.modules.values()) == resident_weight_bytes(merger.modules.values())
    for layer in resumed.residuals:
        assert all(residual.is_residual(again.modules[m.model].get_submodule(m.path)) for m in layer.members)


def test_the_memory_manager_moves_a_residual_base_once_and_runs_it_right(merged, camera):
    models, _, merger, state, _, _ = merged
    import copy

    modules = copy.deepcopy(merger.modules)          # the shared base stays one object across the copies
    x = torch.randn(2, 3, 48, 48)
    with torch.inference_mode():
        want = {k: m(x) for k, m in modules.items()}
    budget = unique_bytes(modules.values())
    mm = MemoryManager(budget, backend=SimulatedBackend(50e9, copies=True))
    for key, module in modules.items():
        mm.register(key, module)
    with torch.inference_mode():
        for key, module in modules.items():
            out, _ = mm.run(key, lambda: module(x))
            assert torch.equal(out, want[key])
    assert mm.backend.allocated_bytes() == unique_bytes(modules.values())
    mm.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_residual_models_run_on_cuda_through_the_memory_manager_under_a_budget(merged):
    """On a GPU: real copies, a budget that holds one model at a time, channels-last layout and
    float16 autocast (as the daemon runs them), the host run's outputs within float16's rounding."""
    import copy

    _, _, merger, _, _, _ = merged
    modules = copy.deepcopy(merger.modules)
    x = torch.randn(4, 3, 48, 48)
    with torch.inference_mode():
        want = {k: m(x) for k, m in modules.items()}
    device = torch.device("cuda:0")
    for m in modules.values():
        m.to(memory_format=torch.channels_last)
    mm = MemoryManager(max(unique_bytes([m]) for m in modules.values()), device)
    for key, module in modules.items():
        mm.register(key, module)
    xd = x.to(device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        for key, module in modules.items():
            out, _ = mm.run(key, lambda: module(xd))
            torch.testing.assert_close(out.float().cpu(), want[key], atol=2e-2, rtol=2e-2)   # float16
    mm.close()


def test_cli_merge_with_residuals_writes_a_loadable_bundle(tmp_path):
    """`edgeva merge --residuals int8` end to end on two models whose heads answer differently:
    sharing the head changes their answers, holding it as base + residual does not."""
    import json

    from edgeva.merging import merge_main

    cfg = two_mobilenet_workload(tmp_path, target=1.0, favoured=(3, 7))   # random weights answer by their bias alone
    out = tmp_path / "out"
    merge_main([str(cfg), "--out", str(out), "--frames", "12", "--min-heldout", "4", "--steps", "0",
                "--residuals", "int8"])
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["residuals"] == "int8"
    assert any(a["origin"] == "residual" for a in report["attempts"])
    assert report["memory"]["bytes_saved"] == report["analysed_bytes_saved"]
    assert "held as base + int8 residual" in (out / "report.txt").read_text()
    bundle = load_bundle(out / "bundle.pt")
    assert bundle.resident_bytes() == report["memory"]["bytes_after"]
    held = sum(1 for _ in residual.residual_layers(bundle.modules))
    assert held == sum(len(r["members"]) for r in report["residual_layers"])
