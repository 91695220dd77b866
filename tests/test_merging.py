"""Gemel-style merging: analysis, measured memory, incremental merge with back-off, bundles, CLI.

Models are tiny CNNs trained (deterministically, on generated frames) toward different
synthetic targets, so their outputs are distinct and non-degenerate before merging.
"""
from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from edgeva.config import TaskConfig
from edgeva.merging import (IncrementalMerger, MergeSettings, QuerySpec, Workload, analyse_modules,
                            build_report, load_bundle, resident_weight_bytes, save_bundle)
from edgeva.confidence import wilson_lower_bound
from edgeva.merging.planner import Candidate
from edgeva.merging.sharing import is_shared
from edgeva.merging.probe import CANDIDATES_PER_FRAME, PROBE, make_candidates, select_for, uncertainty
from edgeva.merging.workload import CameraFrames
from edgeva.models.torchvision_zoo import WholeFrameClassifier

SIZE = 48
LABELS = ["0", "1", "2", "3"]


class TinyNet(nn.Module):
    def __init__(self, width: int = 8, hidden: int = 32, classes: int = 4) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4))
        self.hidden = nn.Linear(2 * width * 16, hidden)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.hidden(self.features(x).flatten(1))))


def make_frames(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        img = np.full((SIZE, SIZE, 3), rng.integers(20, 120, 3), np.uint8)
        for _ in range(3):
            x, y = rng.integers(0, SIZE - 8, 2)
            w, h = rng.integers(8, SIZE // 2, 2)
            img[y:y + h, x:x + w] = rng.integers(0, 256, 3)
        frames.append(img)
    return frames


def brightest_quadrant(img: np.ndarray) -> int:
    h = SIZE // 2
    means = [img[:h, :h].mean(), img[:h, h:].mean(), img[h:, :h].mean(), img[h:, h:].mean()]
    return int(np.argmax(means))


def dominant_channel(img: np.ndarray) -> int:
    m = img.reshape(-1, 3).mean(0)
    return 3 if m.max() - m.min() < 15 else int(np.argmax(m))


TARGETS = {"quadrant": brightest_quadrant, "opposite": lambda img: 3 - brightest_quadrant(img),
           "channel": dominant_channel}


def wrap(module: nn.Module) -> WholeFrameClassifier:
    return WholeFrameClassifier("tinynet", module, LABELS, SIZE, None, torch.device("cpu"))


def trained_model(target: str, seed: int, frames: list[np.ndarray], steps: int = 150) -> WholeFrameClassifier:
    from edgeva.models.preprocess import resize_normalise

    torch.manual_seed(seed)
    net = TinyNet()
    x = resize_normalise(frames, SIZE)
    y = torch.tensor([TARGETS[target](f) for f in frames])
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    return wrap(net.eval())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on busy shared cores: one intra-op thread is an order of magnitude faster."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def camera() -> CameraFrames:
    return CameraFrames(train=make_frames(96, seed=1), heldout=make_frames(48, seed=2))


@pytest.fixture(scope="module")
def specialised(camera) -> dict[str, WholeFrameClassifier]:
    train = make_frames(384, seed=0)
    return {"tiny@quadrant": trained_model("quadrant", 1, train),
            "tiny@quadrant2": trained_model("quadrant", 2, train),
            "tiny@opposite": trained_model("opposite", 3, train),
            "tiny@channel": trained_model("channel", 4, train)}


def copy_model(model: WholeFrameClassifier) -> WholeFrameClassifier:
    net = TinyNet()
    net.load_state_dict(model.module.state_dict())
    return wrap(net.eval())


def workload(models: dict[str, WholeFrameClassifier], targets: dict[str, float], camera: CameraFrames) -> Workload:
    fresh = {k: copy_model(models[k]) for k in targets}
    queries = [QuerySpec(f"q-{k.split('@')[1]}", k, "cam", TaskConfig(type="classify"), t) for k, t in targets.items()]
    return Workload(fresh, queries, {"cam": camera}, {k: "tinynet" for k in targets})


def labels(model, frames) -> list[int]:
    return [o.top1 for o in model.predict(frames)]


# ------------------------------------------------------------------------- analysis

def test_models_differ_and_are_not_degenerate(specialised, camera):
    preds = {k: labels(m, camera.heldout) for k, m in specialised.items()}
    for k, p in preds.items():
        assert len(set(p)) >= 3, f"{k} predicts almost one class: {set(p)}"
    a, b = np.array(preds["tiny@quadrant"]), np.array(preds["tiny@opposite"])
    assert (a == b).mean() < 0.3
    assert (np.array(preds["tiny@quadrant"]) == np.array(preds["tiny@channel"])).mean() < 0.6
    truth = np.array([brightest_quadrant(f) for f in camera.heldout])
    assert (a == truth).mean() > 0.6, "the quadrant model did not learn its target"


def test_analysis_same_architecture_groups_every_conv_and_linear(specialised):
    modules = {k: specialised[k].module for k in ("tiny@quadrant", "tiny@channel")}
    analysis = analyse_modules(modules)
    kinds = sorted(g.signature.kind for g in analysis.groups)
    assert kinds == ["Conv2d"] * 3 + ["Linear"] * 2
    assert all(len(g.members) == 2 for g in analysis.groups)
    # BatchNorm: identical shapes but per-model running statistics, reported and kept private.
    assert sorted(g.signature.kind for g in analysis.private_groups) == ["BatchNorm2d", "BatchNorm2d"]
    shareable = sum(p.numel() * 4 for n, p in modules["tiny@quadrant"].named_parameters() if not n.startswith("features.1")
                    and not n.startswith("features.5"))
    assert analysis.total_bytes_saved == shareable
    assert [g.bytes_saved for g in analysis.groups] == sorted((g.bytes_saved for g in analysis.groups), reverse=True)
    data = analysis.to_json()
    assert data["total_bytes_saved"] == shareable and len(data["groups"]) == 5


def test_signature_distinguishes_hyperparameters():
    from edgeva.merging import layer_signature

    base = layer_signature(nn.Conv2d(8, 8, 3, padding=1))
    assert base == layer_signature(nn.Conv2d(8, 8, 3, padding=1))
    for other in (nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.Conv2d(8, 8, 3, padding=2, dilation=2),
                  nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.Conv2d(8, 8, 3, padding=1, bias=False)):
        assert layer_signature(other) != base
    assert layer_signature(nn.ReLU()) is None


def _meta_modules(*names: str) -> dict[str, nn.Module]:
    with torch.device("meta"):
        return {f"{n}@init": torchvision.models.get_model(n, weights=None) for n in names}


def test_analysis_finds_cross_family_groups():
    resnets = analyse_modules(_meta_modules("resnet18", "resnet50"), {"resnet18@init": "resnet18", "resnet50@init": "resnet50"})
    layers = {g.signature.describe() for g in resnets.groups}
    assert "Conv2d(3->64, 7x7, s2, p3, bias=False)" in layers      # the stem
    assert "Conv2d(64->64, 3x3, p1, bias=False)" in layers
    assert all(resnets.is_cross_family(g) for g in resnets.groups)
    stem = next(g for g in resnets.groups if g.signature.describe().startswith("Conv2d(3->64"))
    assert {m.path for m in stem.members} == {"conv1"}

    vgg_alex = analyse_modules(_meta_modules("vgg16", "alexnet"))
    by_layer = {g.signature.describe(): g for g in vgg_alex.groups}
    assert by_layer["Linear(4096->4096, bias=True)"].bytes_saved == (4096 * 4096 + 4096) * 4
    assert "Linear(4096->1000, bias=True)" in by_layer
    assert "Conv2d(256->256, 3x3, p1, bias=True)" in by_layer       # vgg features.12/14 vs alexnet features.10
    assert not any("9216" in d or "25088" in d for d in by_layer)   # first FC layers differ in input size
    assert vgg_alex.groups[0].signature.describe() == "Linear(4096->4096, bias=True)"


# ------------------------------------------------------------------------ merging

def test_shared_layers_drop_measured_memory_by_analysed_bytes(specialised, camera):
    wl = workload(specialised, {"tiny@quadrant": 0.0, "tiny@channel": 0.0, "tiny@opposite": 0.0}, camera)
    merger = IncrementalMerger(wl, MergeSettings(train_steps=0))
    before = resident_weight_bytes(wl.modules.values())
    state = merger.run()
    assert len(state.accepted) == len(merger.analysis.groups)        # targets of 0: everything merges
    after = resident_weight_bytes(wl.modules.values())
    assert before - after == merger.analysis.total_bytes_saved == merger.memory().bytes_saved
    for g in state.accepted:
        assert is_shared(wl.modules, g)


@pytest.fixture(scope="module")
def merged(specialised, camera, tmp_path_factory):
    targets = {"tiny@quadrant": 0.8, "tiny@quadrant2": 0.8, "tiny@channel": 0.8}
    wl = workload(specialised, targets, camera)
    out = tmp_path_factory.mktemp("merge")
    merger = IncrementalMerger(wl, MergeSettings(train_steps=40, eval_every=10, lr=1e-3, seed=0), out_dir=out)
    state = merger.run()
    return wl, merger, state, out


def test_incremental_merge_meets_every_target_and_saves_measured_bytes(merged):
    wl, merger, state, out = merged
    assert state.accepted, [a.outcome for a in state.attempts]
    assert any(a.train_steps > 0 and a.outcome == "accepted" for a in state.attempts), "nothing needed retraining"
    final = merger.check.of_models({k: 0 for k in wl.models})
    for q in wl.queries:
        assert final[q.query_id] >= q.target, (q.query_id, final)
    mem = merger.memory()
    assert mem.bytes_saved == sum(g.bytes_saved for g in state.accepted) > 0
    report = build_report(merger, state, setup_s=0.0)
    assert report["memory"]["bytes_saved"] == report["analysed_bytes_saved"]
    assert all(q["met"] for q in report["queries"].values())
    assert (out / "progress.json").exists() and (out / "checkpoint.pt").exists()


def test_unreachable_target_is_backed_off_and_reported(specialised, camera):
    targets = {"tiny@quadrant": 0.9, "tiny@quadrant2": 0.9, "tiny@opposite": 1.0}
    wl = workload(specialised, targets, camera)
    before = {k: m.module.head.weight.detach().clone() for k, m in wl.models.items()}
    merger = IncrementalMerger(wl, MergeSettings(train_steps=20, eval_every=10, seed=0))
    head = next(g for g in merger.analysis.groups if g.members[0].path == "head")
    state = merger.initial_state()
    state.queue = deque([Candidate([head])])                          # only the final classifier
    state = merger.run(state)
    first = state.attempts[0]
    assert first.outcome != "accepted"
    assert "q-opposite" in first.failing_queries
    assert first.outcome.startswith("backed off") or first.outcome == "skipped"
    assert all("tiny@opposite" not in g.models for g in state.accepted)
    assert torch.equal(wl.models["tiny@opposite"].module.head.weight, before["tiny@opposite"])  # rolled back
    assert merger.memory().bytes_saved == sum(g.bytes_saved for g in state.accepted)
    final = merger.check.of_models({k: 0 for k in wl.models})
    assert all(final[q.query_id] >= q.target for q in wl.queries)
    text = __import__("edgeva.merging.report", fromlist=["format_report"]).format_report(build_report(merger, state, 0.0))
    assert "q-opposite" in text and ("backed off" in text or "skipped" in text)


def test_bundle_round_trip_keeps_sharing_and_outputs(merged, tmp_path, camera):
    wl, merger, state, _ = merged
    path = save_bundle(tmp_path / "b.pt", merger.modules, state.accepted, merger.meta(), {"note": "x"})
    bundle = load_bundle(path, builder=lambda name, weights, download, device: wrap(TinyNet().eval()))
    assert bundle.report == {"note": "x"}
    assert bundle.resident_bytes() == resident_weight_bytes(merger.modules.values())
    for g in state.accepted:
        layers = [bundle.modules[m.model].get_submodule(m.path) for m in g.members]
        assert len({layer.weight.data_ptr() for layer in layers}) == 1
        assert all(layer.weight is layers[0].weight for layer in layers)
    for key, model in wl.models.items():
        a = np.stack([o.probs for o in model.predict(camera.heldout[:8])])
        b = np.stack([o.probs for o in bundle.models[key].predict(camera.heldout[:8])])
        np.testing.assert_allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- CLI

def two_mobilenet_workload(tmp_path: Path, target: float, favoured: tuple[int, int] | None = None) -> Path:
    """A config of two classify queries (a, b) on one small synthetic street, each running its own
    random-weight mobilenet_v3_small at 64 px; `favoured` gives each model's head a class it
    always answers (bias 10), so the two disagree. Returns the config's path."""
    from edgeva.models import build_model
    from edgeva.synthetic import SceneSpec, write_clip

    video = write_clip(SceneSpec(width=96, height=64, seconds=3, fps=8, seed=3), tmp_path / "street.mp4")
    for seed in (0, 1):
        torch.manual_seed(seed)
        state = build_model("mobilenet_v3_small").module.state_dict()
        if favoured is not None:
            state["classifier.3.bias"][favoured[seed]] = 10.0
        torch.save(state, tmp_path / f"m{seed}.pt")
    cfg = tmp_path / "w.yaml"
    cfg.write_text(f"""
cameras: [{{id: street, source: {video.name}}}]
queries:
  - {{id: a, camera: street, model: mobilenet_v3_small, weights: m0.pt, task: {{type: classify}}, accuracy_target: {target},
      input_size: 64}}
  - {{id: b, camera: street, model: mobilenet_v3_small, weights: m1.pt, task: {{type: classify}}, accuracy_target: {target},
      input_size: 64}}
""")
    return cfg


def test_cli_analyze_merge_resume_and_load(tmp_path):
    from edgeva.merging import merge_main

    cfg = two_mobilenet_workload(tmp_path, target=0.5)
    assert merge_main(["--analyze", str(cfg), "--json"]) == 0
    out = tmp_path / "out"
    common = [str(cfg), "--out", str(out), "--frames", "12", "--min-heldout", "4", "--steps", "4", "--eval-every", "2",
              "--batch", "4"]
    assert merge_main([*common, "--max-trials", "1"]) == 0
    assert len(json.loads((out / "progress.json").read_text())["attempts"]) == 1
    assert merge_main([*common, "--max-trials", "1", "--resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["attempts"]) == 2
    assert report["memory"]["bytes_saved"] == report["analysed_bytes_saved"]
    bundle = load_bundle(out / "bundle.pt")
    assert len(bundle.models) == 2
    assert bundle.resident_bytes() == report["memory"]["bytes_after"]


# ------------------------------------------------- block chains, scoped retraining, resolution

def test_block_chain_reproduces_resnet_and_falls_back_for_a_custom_forward():
    from edgeva.merging.blocks import BlockChain

    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    chain = BlockChain.of(net, x)
    names = chain.block_names()
    assert "layer4.1" in names and "layer1.0" in names and names[-1] == "fc"
    assert chain.block_of("layer4.1.conv2") == names.index("layer4.1")
    with torch.no_grad():
        want = net(x)
        for k in (0, names.index("layer3.0"), names.index("fc")):
            assert torch.allclose(chain.run(chain.run(x, 0, k), k), want, atol=1e-5)
    fingerprints = chain.fingerprints("s")
    with torch.no_grad():
        net.layer4[1].conv2.weight.add_(1e-3)
    after = chain.fingerprints("s")
    k = names.index("layer4.1")
    assert after[:k + 1] == fingerprints[:k + 1] and after[k + 1] != fingerprints[k + 1]
    assert len(BlockChain.of(TinyNet().eval(), torch.randn(2, 3, SIZE, SIZE))) == 1   # relu between its heads


def test_share_group_mean_init_starts_at_the_members_mean():
    from edgeva.merging.sharing import share_group

    a, b = TinyNet(), TinyNet()
    wa, wb = a.head.weight.detach().clone(), b.head.weight.detach().clone()
    group = next(g for g in analyse_modules({"a": a, "b": b}).groups if g.members[0].path == "head")
    share_group({"a": a, "b": b}, group, init="mean")
    assert a.head.weight is b.head.weight
    assert torch.allclose(a.head.weight, (wa + wb) / 2)


def test_sharing_bit_identical_layers_keeps_their_exact_weights():
    """The mean of five equal float tensors is rounded (about one element in eight moves by an
    ulp), which flips answers of frames at a model's decision boundary: equal layers are shared as they are."""
    from edgeva.merging.sharing import share_group

    nets = {k: TinyNet() for k in "abcde"}
    torch.manual_seed(3)
    weight = torch.randn_like(nets["a"].hidden.weight)
    for net in nets.values():
        with torch.no_grad():
            net.hidden.weight.copy_(weight)
            net.hidden.bias.copy_(nets["a"].hidden.bias)
    group = next(g for g in analyse_modules(nets).groups if g.members[0].path == "hidden")
    share_group(nets, group, init="mean")
    assert nets["a"].hidden.weight is nets["e"].hidden.weight
    assert torch.equal(nets["a"].hidden.weight, weight)


def _resnet_family(camera: CameraFrames, n: int = 2) -> dict[str, WholeFrameClassifier]:
    """Copies of one base whose layer3/layer4/fc drifted, as per-camera fine-tuning leaves them. The
    base's head splits the camera's frames along their features' main direction, so the answers
    vary from frame to frame (a random-init head would answer one class everywhere)."""
    from edgeva.models.preprocess import resize_normalise

    torch.manual_seed(5)
    net = torchvision.models.resnet18(num_classes=2).eval()
    with torch.no_grad():
        net.fc = nn.Identity()
        feats = net(resize_normalise(camera.train, 64))
        centred = feats - feats.mean(0)
        direction = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        proj = centred @ direction
        scale = 4.0 / proj.std()
        net.fc = nn.Linear(512, 2)
        net.fc.weight.copy_(torch.stack([direction, -direction]) * scale)
        middle = (feats.mean(0) @ direction + proj.median()) * scale
        net.fc.bias.copy_(torch.stack([-middle, middle]))
    base = net.state_dict()
    models = {}
    for i in range(n):
        copy = torchvision.models.resnet18(num_classes=2)
        g = torch.Generator().manual_seed(10 + i)
        state = {k: (v + 0.3 * v.std() * torch.randn(v.shape, generator=g)
                     if k.startswith(("layer3", "layer4")) and v.is_floating_point() and v.ndim > 1 else v)
                 for k, v in base.items()}
        copy.load_state_dict(state)
        models[f"resnet18@copy{i}"] = WholeFrameClassifier("resnet18", copy.eval(), ["a", "b"], 64, None,
                                                            torch.device("cpu"))
    return models


def test_a_step_retrains_only_the_blocks_from_its_first_shared_layer_on_cached_activations(camera):
    models = _resnet_family(camera)
    before = {k: {n: p.detach().clone() for n, p in m.module.named_parameters()} for k, m in models.items()}
    queries = [QuerySpec(f"q{i}", k, "cam", TaskConfig(type="classify"), 1.0) for i, k in enumerate(models)]
    wl = Workload(models, queries, {"cam": camera}, {k: "resnet18" for k in models})
    merger = IncrementalMerger(wl, MergeSettings(train_steps=4, eval_every=2, batch_size=4, patience=5, max_trials=1))
    state = merger.initial_state()
    first = state.queue[0]
    assert all(p.startswith("layer4.") for g in first.groups for p in [g.members[0].path])
    state.queue = deque([first])
    hits = merger.cache.hits
    state = merger.run(state)
    attempt = state.attempts[0]
    assert attempt.train_steps > 0                      # a target of 1.0 is not met by sharing alone
    start = min(attempt.trained_from.values())
    assert start.startswith("layer4.")
    scoped = {n for n, _ in models["resnet18@copy0"].module.named_parameters()
              if n.startswith(start + ".") or n.startswith(("layer4.1", "fc"))}
    per_model = sum(p.numel() * 4 for n, p in models["resnet18@copy0"].module.named_parameters() if n in scoped)
    shared = sum(g.signature.param_bytes for g in first.groups)
    assert attempt.trained_bytes == 2 * per_model - shared   # both models' blocks, the shared tensors once
    assert merger.cache.hits > hits                         # held-out and training activations came from the cache
    if attempt.outcome != "accepted":                       # rolled back bit for bit
        for k, m in models.items():
            for n, p in m.module.named_parameters():
                assert torch.equal(p, before[k][n]), n
    for k, m in models.items():                             # blocks before the step never change
        for n, p in m.module.named_parameters():
            if n.startswith(("conv1", "bn1", "layer1", "layer2", "layer3")):
                assert torch.equal(p, before[k][n]), n


def test_heldout_split_keeps_at_least_min_heldout_frames(tmp_path):
    from edgeva.merging.workload import read_camera_frames
    from edgeva.synthetic import SceneSpec, write_clip

    clip = write_clip(SceneSpec(width=64, height=64, seconds=5, fps=8, seed=1), tmp_path / "c.mp4")
    frames = read_camera_frames(str(clip), 40, None, min_heldout=25)
    assert len(frames.heldout) == 25 and len(frames.train) == 15
    assert read_camera_frames(str(clip), 40, None).heldout.__len__() == 12     # 30 % by default


@pytest.mark.parametrize("frames", [260, 900])
def test_sampled_frames_carry_their_numbers_in_the_source(tmp_path, frames):
    """The family builders label a merge's training frames by these numbers: each must be the
    frame decoded at that position, and no held-out frame may be among the training ones."""
    import cv2

    from edgeva.merging.workload import read_camera_frames
    from tests.conftest import write_test_clip

    clip = write_test_clip(tmp_path / "c.mp4", frames=frames, size=(640, 96))
    sampled = read_camera_frames(str(clip), 120, None, min_heldout=40)
    assert len(sampled.train_numbers) == len(sampled.train) and len(sampled.heldout_numbers) == 40
    numbers = sampled.train_numbers + sampled.heldout_numbers
    assert numbers == sorted(set(numbers)) and numbers[-1] == frames - 1
    cap = cv2.VideoCapture(str(clip))
    decoded = [cap.read()[1] for _ in range(frames)]
    for number, image in zip(numbers, sampled.train + sampled.heldout):
        assert np.array_equal(decoded[number], image)


def test_distil_on_all_cameras_trains_each_model_on_every_cameras_frames(specialised, camera):
    other = CameraFrames(train=make_frames(40, seed=7), heldout=make_frames(12, seed=8))
    models = {k: copy_model(specialised[k]) for k in ("tiny@quadrant", "tiny@channel")}
    queries = [QuerySpec("q-a", "tiny@quadrant", "cam", TaskConfig(type="classify"), 0.5),
               QuerySpec("q-b", "tiny@channel", "side", TaskConfig(type="classify"), 0.5)]
    wl = Workload(models, queries, {"cam": camera, "side": other}, {k: "tinynet" for k in models})
    assert IncrementalMerger(wl, MergeSettings(train_steps=0)).teachers == {}   # no retraining, no targets
    own = IncrementalMerger(wl, MergeSettings(train_steps=1))
    assert len(own.teachers["tiny@quadrant"].inputs) == len(camera.train)
    assert len(own.teachers["tiny@channel"].inputs) == len(other.train)
    everywhere = IncrementalMerger(wl, MergeSettings(train_steps=1, distil_on="all"))
    for key in models:
        assert len(everywhere.teachers[key].inputs) == len(camera.train) + len(other.train)
    assert [len(r) for r in everywhere.check.references["q-b"]] == [len(other.heldout)]   # checked on its own camera
    checked = IncrementalMerger(wl, MergeSettings(train_steps=0, check_on="all"))
    assert checked.check.checked_cameras("q-b") == ["side", "cam"]
    assert [len(r) for r in checked.check.references["q-b"]] == [len(other.heldout), len(camera.heldout)]
    assert checked.check.judged_frames("q-b") == len(other.heldout)
    assert checked.check.through_predict() == {"q-a": 1.0, "q-b": 1.0}    # nothing merged yet


def _flat(value: int, n: int) -> list[np.ndarray]:
    return [np.full((SIZE, SIZE, 3), value, np.uint8) for _ in range(n)]


def test_probe_candidates_come_from_the_pools_given_and_take_every_maker_in_turn():
    dark, bright = _flat(0, 20), [np.full((SIZE, 2 * SIZE, 3), 255, np.uint8) for _ in range(10)]
    made = make_candidates([bright, bright[:3]], 20, seed=3)
    assert len(made) == 20 and all(f.shape == (SIZE, 2 * SIZE, 3) for f in made)
    # a bright pool never gives a dark candidate (the darkest, a recoloured one, is 255 * 0.5 - 40)
    assert min(int(f.min()) for f in made) >= 87
    assert max(int(f.max()) for f in make_candidates([dark], 20, seed=3)) <= 40
    varied = make_candidates([make_frames(30, seed=5), make_frames(30, seed=6)], 10, seed=1)
    grey = varied[4::5]                                   # the fifth maker: a grey picture
    assert all((f[..., 0] == f[..., 1]).all() and (f[..., 1] == f[..., 2]).all() for f in grey)
    assert not any((f[..., 0] == f[..., 1]).all() for f in varied[:4])
    assert make_candidates([[], []], 5) == []


def test_a_classifier_is_probed_where_its_original_is_least_sure(specialised):
    model = specialised["tiny@quadrant"]
    candidates = make_frames(60, seed=11)
    chosen = select_for(model, candidates, 12)
    scores = [uncertainty(o) for o in model.predict(candidates)]
    expected = sorted(np.argsort(scores)[::-1][:12])
    assert [id(f) for f in chosen] == [id(candidates[i]) for i in expected]
    assert min(scores[i] for i in expected) >= np.median(scores)


def test_the_probe_is_checked_for_every_query_and_distilled_on(specialised, camera):
    """A merged model can agree with its original wherever the original is sure and still flip
    the frames of a new scene where it is not: probe frames are checked for every query, even on
    the lenient own-camera setting, and a query is judged by them when they are its worst frames."""
    models = {"tiny@quadrant": copy_model(specialised["tiny@quadrant"])}
    pools = [camera.heldout, make_frames(16, seed=10)]
    frames = {"cam": camera, PROBE: CameraFrames(make_candidates([camera.train], 10 * CANDIDATES_PER_FRAME, 1),
                                                 make_candidates(pools, 20 * CANDIDATES_PER_FRAME, 2))}
    wl = Workload(models, [QuerySpec("q-a", "tiny@quadrant", "cam", TaskConfig(type="classify"), 0.9)],
                  frames, {"tiny@quadrant": "tinynet"})
    merger = IncrementalMerger(wl, MergeSettings(train_steps=1))
    assert merger.check.checked_cameras("q-a") == ["cam", PROBE]
    assert [len(r) for r in merger.check.references["q-a"]] == [len(camera.heldout), 20]
    assert len(merger.teachers["tiny@quadrant"].inputs) == len(camera.train) + 10
    refs = merger.check.references["q-a"]
    flipped = [dict(v, label="not-" + v["label"]) for v in refs[1]]
    assert merger.check.agreement("q-a", [refs[0], flipped]) == 0.0
    plain = Workload(models, wl.queries, {"cam": camera}, wl.architectures)
    assert IncrementalMerger(plain, MergeSettings(train_steps=0)).fingerprint() != merger.fingerprint()


def test_models_probed_on_different_frames_never_share_cached_activations(camera):
    """Cached activations were keyed by camera name: two models whose first blocks are identical
    but whose probe frames differ read each other's activations (every trial then "failed")."""
    models = _resnet_family(camera, 2)                     # identical up to layer3, then drifted
    frames = {"cam": camera, PROBE: CameraFrames(make_candidates([camera.train], 8 * CANDIDATES_PER_FRAME, 1),
                                                 make_candidates([camera.heldout], 16 * CANDIDATES_PER_FRAME, 2))}
    queries = [QuerySpec(f"q-{k}", k, "cam", TaskConfig(type="classify"), 0.9) for k in models]
    merger = IncrementalMerger(Workload(models, queries, frames, {k: "resnet18" for k in models}),
                               MergeSettings(train_steps=0))
    one, two = (merger.runners[k] for k in models)
    assert [id(f) for f in one.heldout_frames[PROBE]] != [id(f) for f in two.heldout_frames[PROBE]]
    layer3 = one.start_of(["layer3.0.conv1"])
    assert layer3 > 0
    for runner, model in ((one, models["resnet18@copy0"]), (two, models["resnet18@copy1"])):
        late = [o.probs for o in runner.outputs(PROBE, start=layer3)]
        np.testing.assert_allclose(late, [o.probs for o in model.predict(runner.heldout_frames[PROBE])], atol=1e-4)


def test_a_detector_retrains_after_predict_ran_under_inference_mode(camera):
    """ultralytics' Detect head caches anchors from the last forward; predict() runs under
    torch.inference_mode, so a retraining step after it must not reuse those tensors."""
    from edgeva.models import build_model

    models = {}
    for i in range(2):
        m = build_model("yolov8n", None)
        m.input_size, m.min_score = 64, 0.0
        torch.manual_seed(i)
        with torch.no_grad():
            for p in m.module.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        models[f"yolov8n@copy{i}"] = m
    task = TaskConfig(type="count", classes=["person"], confidence=0.0)
    # a target above 1 is never met by sharing alone, so the trial always retrains
    queries = [QuerySpec(f"q{i}", k, "cam", task, 1.01) for i, k in enumerate(models)]
    wl = Workload(models, queries, {"cam": CameraFrames(camera.train[:8], camera.heldout[:6])},
                  {k: "yolov8n" for k in models})
    # the training batch has the shape of predict's last held-out batch, so Detect's cache hits
    merger = IncrementalMerger(wl, MergeSettings(train_steps=2, eval_every=1, batch_size=6, patience=5))
    state = merger.initial_state()
    state.queue = deque([state.queue[0]])
    state = merger.run(state)
    attempt = state.attempts[0]
    assert attempt.train_steps > 0 and attempt.outcome != "accepted"


def test_accept_on_lower_bound_judges_targets_by_the_wilson_bound(specialised, camera):
    models = {k: copy_model(specialised[k]) for k in ("tiny@quadrant", "tiny@quadrant2")}
    queries = [QuerySpec("q-a", "tiny@quadrant", "cam", TaskConfig(type="classify"), 0.9),
               QuerySpec("q-b", "tiny@quadrant2", "cam", TaskConfig(type="classify"), 0.9)]
    wl = Workload(models, queries, {"cam": camera}, {k: "tinynet" for k in models})
    mean = IncrementalMerger(wl, MergeSettings(train_steps=0))
    bound = IncrementalMerger(wl, MergeSettings(train_steps=0, accept_on="lower-bound"))
    n = len(camera.heldout)                       # 48 frames: 0.95 has a lower bound near 0.83
    assert mean.check.target_met("q-a", 0.95) and not bound.check.target_met("q-a", 0.95)
    assert bound.check.target_met("q-a", 1.0) == (wilson_lower_bound(1.0, n) >= 0.9)


def test_check_on_all_judges_a_query_by_its_worst_camera(specialised, camera):
    """Pooling cameras would let frames easy to agree on elsewhere hide a fall on one camera."""
    other = CameraFrames(train=make_frames(8, seed=7), heldout=make_frames(12, seed=8))
    models = {"tiny@quadrant": copy_model(specialised["tiny@quadrant"])}
    wl = Workload(models, [QuerySpec("q-a", "tiny@quadrant", "cam", TaskConfig(type="classify"), 0.9)],
                  {"cam": camera, "side": other}, {"tiny@quadrant": "tinynet"})
    merger = IncrementalMerger(wl, MergeSettings(train_steps=0, check_on="all"))
    refs = merger.check.references["q-a"]
    # every answer right on the query's own camera, every answer wrong on the other one
    wrong = [dict(v, label="not-" + v["label"]) for v in refs[1]]
    assert merger.check.agreement("q-a", [refs[0], wrong]) == 0.0
    assert merger.check.agreement("q-a", [refs[0], refs[1]]) == 1.0


def test_lower_bound_acceptance_steers_retraining_to_queries_short_on_their_bound(specialised, camera):
    models = {k: copy_model(specialised[k]) for k in ("tiny@quadrant", "tiny@channel")}
    queries = [QuerySpec("q-a", "tiny@quadrant", "cam", TaskConfig(type="classify"), 0.9),
               QuerySpec("q-b", "tiny@channel", "cam", TaskConfig(type="classify"), 0.9)]
    wl = Workload(models, queries, {"cam": camera}, {k: "tinynet" for k in models})
    bound = IncrementalMerger(wl, MergeSettings(train_steps=0, accept_on="lower-bound"))
    mean = IncrementalMerger(wl, MergeSettings(train_steps=0))
    # q-a meets its target on the mean but not on the lower bound (48 frames)
    weights = bound._lag_weights(list(models), {"q-a": 0.9, "q-b": 1.0})
    assert weights["tiny@quadrant"] > 2 * weights["tiny@channel"]
    even = mean._lag_weights(list(models), {"q-a": 0.9, "q-b": 1.0})
    assert even["tiny@quadrant"] == pytest.approx(even["tiny@channel"])


# ------------------------------------------------------------------ retraining budget

def _history(models: list[str], retrainings: int, rescued: bool, untrained_bytes: int) -> list:
    """Trials as a run would have recorded them: some retrained (rescued or not), one accepted
    without retraining in one second."""
    from edgeva.merging.merger import Attempt
    out = [Attempt(i, "plan", "x", models, [], 10_000, {}, {}, 20, 11.0, "accepted" if rescued else "skipped",
                   retrain_seconds=10.0) for i in range(retrainings)]
    out.append(Attempt(len(out), "plan", "y", models, [], untrained_bytes, {}, {}, 0, 1.0, "accepted"))
    return out


FAILING_HEAD = {"tiny@quadrant": 0.9, "tiny@opposite": 1.0}     # sharing the head fails q-opposite


def _head_trial(specialised, camera, settings: MergeSettings, retrainings: int, rescued: bool,
                untrained_bytes: int, short_of_time: bool):
    """Share the final classifier of FAILING_HEAD's models after the given trial history; short of
    time: more queued behind it than a minute of 1 s untrained trials can try (one trial runs)."""
    merger = IncrementalMerger(workload(specialised, FAILING_HEAD, camera), settings)
    head = Candidate([next(g for g in merger.analysis.groups if g.members[0].path == "head")])
    state = merger.initial_state()
    state.attempts = _history(list(FAILING_HEAD), retrainings, rescued, untrained_bytes)
    state.queue = deque([head])
    if short_of_time:
        merger.settings.time_budget_s, merger.settings.max_trials = 60.0, 1
        state.queue.extend([head] * 100)
    return merger, merger.run(state)


def test_retraining_stops_for_an_architecture_once_it_has_not_paid(specialised, camera):
    merger, state = _head_trial(specialised, camera, MergeSettings(train_steps=20, eval_every=10, seed=0),
                                retrainings=3, rescued=False, untrained_bytes=10_000_000, short_of_time=True)
    trial = state.attempts[-1]
    assert trial.failing_queries and trial.train_steps == 0 and trial.retrain_seconds == 0
    assert trial.note.startswith("not retrained")
    text = __import__("edgeva.merging.report", fromlist=["format_report"]).format_report(build_report(merger, state, 0.0))
    assert "not retrained" in text


@pytest.mark.parametrize("budget_s", [None, 3600.0])
def test_with_time_to_spare_a_failing_trial_is_retrained_whatever_retraining_paid(specialised, camera, budget_s):
    _, state = _head_trial(specialised, camera, MergeSettings(train_steps=20, eval_every=10, seed=0,
                                                              time_budget_s=budget_s),
                           retrainings=3, rescued=False, untrained_bytes=10_000_000, short_of_time=False)
    trial = state.attempts[-1]
    assert trial.failing_queries and trial.train_steps > 0 and not trial.note


def test_retraining_goes_on_while_it_rescues_trials(specialised, camera):
    _, state = _head_trial(specialised, camera, MergeSettings(train_steps=20, eval_every=10, seed=0),
                           retrainings=3, rescued=True, untrained_bytes=10, short_of_time=True)
    trial = state.attempts[-1]
    assert trial.failing_queries and trial.train_steps > 0 and trial.retrain_seconds > 0 and not trial.note


def test_retrain_budget_compares_expected_yield_with_untrained_trials():
    from edgeva.merging.retrain_budget import RetrainBudget
    budget = RetrainBudget()
    assert budget.worth_retraining(["yolo"], 1)                  # never retrained: try it
    budget.record(["yolo"], retrain_seconds=0.0, rescued=False, trial_seconds=10.0, bytes_accepted_untrained=10_000)
    budget.record(["yolo"], retrain_seconds=90.0, rescued=False, trial_seconds=100.0, bytes_accepted_untrained=0)
    assert budget.plain_yield() == pytest.approx(10_000 / 20.0)
    # one failed retraining: chance 1/3, 90 s each -> 3 MiB at stake yields ~11.6 KiB/s > 500 B/s
    assert budget.worth_retraining(["yolo"], 3 * 2**20)
    assert not budget.worth_retraining(["yolo"], 100_000)         # 1/3 * 100 kB / 90 s = 370 B/s < 500 B/s
    assert budget.worth_retraining(["resnet"], 1)                # another architecture has its own record
    assert not budget.worth_retraining(["resnet", "yolo"], 100_000)   # the least promising one decides
    budget.record(["yolo"], retrain_seconds=90.0, rescued=True, trial_seconds=100.0, bytes_accepted_untrained=0)
    assert budget.by_architecture["yolo"].rescue_chance == pytest.approx(2 / 4)


def test_a_trial_not_retrained_stops_checking_at_the_first_query_that_misses(specialised, camera):
    targets = {"tiny@quadrant": 0.9, "tiny@quadrant2": 0.9, "tiny@opposite": 1.0}
    wl = workload(specialised, targets, camera)
    merger = IncrementalMerger(wl, MergeSettings(train_steps=0))
    head = next(g for g in merger.analysis.groups if g.members[0].path == "head")
    state = merger.initial_state()
    state.queue = deque([Candidate([head])])
    state = merger.run(state)
    trial = state.attempts[0]
    # the query with least slack (a target of 1.0) is checked first, and the check stops there
    assert list(trial.agreement_shared) == ["q-opposite"] and trial.failing_queries == ["q-opposite"]
    assert trial.outcome.startswith("backed off: subset")      # the two untested models are tried on their own
    follow_up = state.attempts[1]
    assert set(follow_up.agreement_shared) == {"q-quadrant", "q-quadrant2"}
    assert not trial.note                                      # nothing to retrain with: no budget note



def test_a_merge_resumes_with_backed_off_groups_queued_and_accepted(specialised, camera, tmp_path):
    targets = {"tiny@quadrant": 0.0, "tiny@quadrant2": 0.0, "tiny@opposite": 1.0}
    wl = workload(specialised, targets, camera)
    merger = IncrementalMerger(wl, MergeSettings(train_steps=0, max_trials=1), out_dir=tmp_path)
    head = next(g for g in merger.analysis.groups if g.members[0].path == "head")
    state = merger.initial_state()
    state.queue = deque([Candidate([head])])
    state = merger.run(state)                   # fails on q-opposite: the other two are queued
    resumed = IncrementalMerger(wl, MergeSettings(train_steps=0, max_trials=1), out_dir=tmp_path).resume()
    assert resumed.queue[0].models == ("tiny@quadrant", "tiny@quadrant2") and resumed.queue[0].origin == "subset"
    merger = IncrementalMerger(wl, MergeSettings(train_steps=0, max_trials=1), out_dir=tmp_path)
    state = merger.run(merger.resume())
    assert state.attempts[-1].outcome == "accepted"
    again = IncrementalMerger(wl, MergeSettings(train_steps=0), out_dir=tmp_path).resume()
    assert [g.models for g in again.accepted] == [("tiny@quadrant", "tiny@quadrant2")]

def test_a_trial_not_retrained_checks_only_the_models_its_sharing_changed(specialised, camera):
    targets = {"tiny@quadrant": 0.0, "tiny@quadrant2": 0.0, "tiny@opposite": 0.0}
    wl = workload(specialised, targets, camera)
    merger = IncrementalMerger(wl, MergeSettings(train_steps=0))
    head = next(g for g in merger.analysis.groups if g.members[0].path == "head")
    conv = next(g for g in merger.analysis.groups if g.members[0].path != "head")
    state = merger.initial_state()
    # the head shared by all three ties them into one sharing closure; the conv then over two
    state.queue = deque([Candidate([head]), Candidate([conv.restricted_to(("tiny@quadrant", "tiny@opposite"))])])
    state = merger.run(state)
    assert [a.outcome for a in state.attempts] == ["accepted", "accepted"]
    assert set(state.attempts[0].agreement_shared) == {"q-quadrant", "q-quadrant2", "q-opposite"}
    assert set(state.attempts[1].agreement_shared) == {"q-quadrant", "q-opposite"}


@pytest.mark.parametrize("rescued_before, steps", [(False, 10), (True, 30)])
def test_short_of_time_unproven_retraining_ends_at_its_first_check_without_progress(specialised, camera,
                                                                                   rescued_before, steps):
    # lr 0: retraining never changes anything, so no check ever shows progress
    _, state = _head_trial(specialised, camera, MergeSettings(train_steps=60, eval_every=10, lr=0.0, patience=3, seed=0),
                           retrainings=int(rescued_before), rescued=rescued_before, untrained_bytes=10,
                           short_of_time=True)
    assert state.attempts[-1].train_steps == steps
