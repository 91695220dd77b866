#!/usr/bin/env python
"""Build a realistic classifier family for merging: one pretrained base, then per-camera /
per-task copies fine-tuned from it, all labelled by the real INT8 detector. Everything is cached
under --out (default var/family, gitignored), so later runs only rebuild what is missing.

Stages (each skipped when its output exists):
  1. labels  YOLOv8n INT8 (../shared/weights) on frames sampled from each tune/ clip, split into
             train / held-out exactly as `edgeva merge` splits them (the held-out part is never
             trained on); frames are cached resized to 224x224 (the classifier's input).
  2. base    a `yolov8n-cls` whose backbone (layers 0-8) is the real COCO detector's, dequantised
             from its INT8 export (tools/import_openvino_detector.py): pretrained features, as a
             fleet starts from ImageNet or COCO weights. Its head is fitted on multi-label presence
             / count targets over every camera's train frames (backbone frozen).
  3. copies  NoScope-style specialised models, one per FAMILY entry: layers 0-6 kept (their
             features cached), a new head fitted on the frozen features (linear probe), then
             layers 7-8 (the last stage, 67 % of the weights) and the head fine-tuned together at
             224 px with a small learning rate (LP-FT), so the copies stay close to the base as
             real per-camera specialisation does. Each copy is a state dict with its class names.
  4. config  configs/family.yaml's queries point at these weights (input_size 224).

    nice -n 10 .venv/bin/python tools/make_family.py            # ~5-10 min on 2 busy cores
    .venv/bin/python tools/make_family.py --report              # label balance, accuracy, variety
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from edgeva.merging.workload import read_camera_frames  # noqa: E402
from edgeva.models.yolo_classifier import yolo_classifier_network  # noqa: E402

SHARED = REPO_ROOT.parent / "shared"
TUNE = SHARED / "videos" / "tune"
DETECTOR = SHARED / "weights" / "yolov8n_int8_openvino_model"
INPUT = 224
ARCH = "yolov8n-cls"
FROZEN = 7                       # layers 0..6 stay the base's in every copy
FRAMES_PER_CAMERA = 600          # the same sampling and split `edgeva merge --frames 600` uses
MIN_HELDOUT = 200
CAMERAS = {
    "highway": "bgslibrary_video03_highway.avi",
    "junction": "ahmetozlu_vehicle_counting_input_video.mp4",
    "crossing": "degirum_aerial_crossing_pedestrians_bikes_cropped.mp4",
    "corridor": "intel_one-by-one-person-detection.mp4",
}
VEHICLES = ("car", "truck", "bus", "motorcycle")
BASE_CLASSES = ("person", "bicycle", "car", "motorcycle", "bus", "truck")
CONFIDENCE = 0.4


# ------------------------------------------------------------------ labels

def sample_camera(name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    cam = read_camera_frames(str(TUNE / CAMERAS[name]), FRAMES_PER_CAMERA, None, min_heldout=MIN_HELDOUT)
    return cam.train, cam.heldout


def stage_labels(out: Path) -> None:
    from edgeva.models import build_model

    detector = build_model("yolov8n", str(DETECTOR))
    names = detector.class_names
    for cam in CAMERAS:
        path = out / "labels" / f"{cam}.npz"
        if path.exists():
            continue
        t0 = time.monotonic()
        train, heldout = sample_camera(cam)
        frames = train + heldout
        counts = np.zeros((len(frames), len(names)), np.int16)
        for i in range(0, len(frames), 8):
            for j, det in enumerate(detector.predict(frames[i:i + 8])):
                for c in det.class_ids[det.scores >= CONFIDENCE]:
                    counts[i + j, c] += 1
        small = np.stack([cv2.resize(f, (INPUT, INPUT), interpolation=cv2.INTER_AREA) for f in frames])
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, counts=counts, images=small, n_train=len(train), names=np.array(names))
        print(f"labels {cam}: {len(train)} train + {len(heldout)} held-out frames in {time.monotonic() - t0:.0f}s",
              flush=True)


@dataclass
class CameraData:
    images: np.ndarray     # N x 224 x 224 x 3 BGR uint8 (resize_normalise's first step)
    counts: np.ndarray     # N x 80 detections per COCO class at CONFIDENCE
    n_train: int
    names: list[str]

    def count(self, classes: tuple[str, ...]) -> np.ndarray:
        return self.counts[:, [self.names.index(c) for c in classes]].sum(1)


def load_camera(out: Path, cam: str) -> CameraData:
    d = np.load(out / "labels" / f"{cam}.npz")
    return CameraData(d["images"], d["counts"].astype(np.int64), int(d["n_train"]), [str(n) for n in d["names"]])


def normalise(images: np.ndarray, size: int = INPUT) -> torch.Tensor:
    """The yolov8n-cls input: RGB in [0, 1], no mean/std (edgeva.models.yolo_classifier)."""
    if size != images.shape[1]:
        images = np.stack([cv2.resize(i, (size, size), interpolation=cv2.INTER_AREA) for i in images])
    return torch.from_numpy(images[..., ::-1].copy()).permute(0, 3, 1, 2).float().div_(255.0)


def network(classes: int) -> torch.nn.Sequential:
    return yolo_classifier_network(ARCH, classes)


def run_layers(net: torch.nn.Sequential, x: torch.Tensor, start: int, stop: int, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([net[start:stop](x[i:i + batch]) for i in range(0, len(x), batch)])


# -------------------------------------------------------------------- base

def base_targets(data: CameraData) -> np.ndarray:
    """Presence of 6 classes, plus 'more than 2 / more than 5' vehicles and people."""
    cols = [data.count((c,)) > 0 for c in BASE_CLASSES]
    vehicles, people = data.count(VEHICLES), data.count(("person",))
    cols += [vehicles > 2, vehicles > 5, people > 2, people > 5]
    return np.stack(cols, 1).astype(np.float32)


def detector_backbone() -> dict[str, torch.Tensor]:
    """Layers 0-8 of the real COCO YOLOv8n, keyed as in the yolov8n-cls network."""
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    import import_openvino_detector as importer

    detector = importer.build_checkpoint(DETECTOR)
    return {k[len("model."):]: v for k, v in detector.state_dict().items()
            if k.startswith("model.") and int(k.split(".")[1]) < 9}


def stage_base(out: Path, epochs: int, seed: int) -> None:
    path = out / "base_yolov8n_cls.pt"
    if path.exists():
        return
    t0 = time.monotonic()
    targets = ["present:" + c for c in BASE_CLASSES] + ["vehicles>2", "vehicles>5", "people>2", "people>5"]
    net = network(len(targets))
    missing, unexpected = net.load_state_dict(detector_backbone(), strict=False)
    assert not unexpected and all(k.startswith("9.") for k in missing), (missing, unexpected)
    net.eval()
    xs, ys = [], []
    for cam in CAMERAS:
        data = load_camera(out, cam)
        x = normalise(data.images[:data.n_train])
        xs += [run_layers(net, x, 0, 9), run_layers(net, x.flip(3), 0, 9)]
        y = torch.from_numpy(base_targets(data)[:data.n_train])
        ys += [y, y]
    feats, y = torch.cat(xs), torch.cat(ys)
    head = net[9]
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=1e-4)
    pos = y.mean(0).clamp(0.02, 0.98)
    gen = torch.Generator().manual_seed(seed)
    steps = epochs * (len(feats) // 64)
    for step in range(steps):
        idx = torch.randint(len(feats), (64,), generator=gen)
        loss = F.binary_cross_entropy_with_logits(head(feats[idx]), y[idx], pos_weight=(1 - pos) / pos)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            print(f"base head step {step}/{steps} loss {loss.item():.3f} ({time.monotonic() - t0:.0f}s)", flush=True)
    net.eval()
    torch.save({"state_dict": net.state_dict(), "class_names": targets}, path)
    print(f"base: the detector's backbone, head fitted in {time.monotonic() - t0:.0f}s", flush=True)


# ------------------------------------------------------------------ copies

@dataclass(frozen=True)
class Specialised:
    name: str
    camera: str
    classes: tuple[str, ...]
    label: Callable[[CameraData], np.ndarray]     # class index per frame


def buckets(classes: tuple[str, ...], edges: tuple[int, ...]) -> Callable[[CameraData], np.ndarray]:
    return lambda d: np.searchsorted(np.array(edges), d.count(classes), side="right")


# Thresholds chosen from the train frames' detector counts so no copy is a constant. The junction
# clip is left out: its held-out end is quiet (191 of 200 frames with <= 2 vehicles) while its
# training part is busy, so a junction traffic model answered one class on every held-out frame.
FAMILY = (
    Specialised("highway-traffic", "highway", ("light", "moderate", "heavy"), buckets(VEHICLES, (3, 5))),
    Specialised("highway-truck", "highway", ("no-truck", "truck"), buckets(("truck",), (1,))),
    Specialised("highway-heavy", "highway", ("below-5-vehicles", "5-or-more-vehicles"), buckets(VEHICLES, (5,))),
    Specialised("crossing-person", "crossing", ("nobody", "person"), buckets(("person",), (1,))),
    Specialised("corridor-person", "corridor", ("nobody", "person"), buckets(("person",), (1,))),
)


def specialised_weights(out: Path, spec: Specialised) -> Path:
    return out / ARCH / f"{spec.name}.pt"


def stage_copies(out: Path, steps: int, lr: float, seed: int) -> None:
    """Linear probe, then fine-tune (LP-FT): the new head is first fitted on the base's frozen
    features, so the joint fine-tuning of layers 7-8 + head starts from a sensible head and its
    small learning rate keeps those layers close to the base."""
    base = torch.load(out / "base_yolov8n_cls.pt", weights_only=True)["state_dict"]
    features: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, spec in enumerate(FAMILY):
        path = specialised_weights(out, spec)
        if path.exists():
            continue
        t0 = time.monotonic()
        data = load_camera(out, spec.camera)
        labels = torch.from_numpy(spec.label(data)[:data.n_train]).long()
        net = network(len(spec.classes))
        net.load_state_dict({k2: v for k2, v in base.items() if not k2.startswith("9.linear.")}, strict=False)
        net.eval()     # batch-norm statistics stay the base's
        if spec.camera not in features:    # the frozen part runs once per frame (and per camera)
            x = normalise(data.images[:data.n_train])
            features[spec.camera] = (run_layers(net, x, 0, FROZEN), run_layers(net, x.flip(3), 0, FROZEN))
        feats, flipped = features[spec.camera]
        freq = torch.bincount(labels, minlength=len(spec.classes)).float().clamp_min(1)
        weight = (freq.sum() / freq) / (freq.sum() / freq).mean()
        head = net[9]
        with torch.no_grad():
            pooled = torch.cat([head.pool(head.conv(run_layers(net, f, FROZEN, 9))).flatten(1) for f in (feats, flipped)])
        probe = torch.optim.Adam(head.linear.parameters(), lr=1e-2)
        both = torch.cat([labels, labels])
        for _ in range(300):                # full-batch linear probe on cached features
            probe.zero_grad()
            F.cross_entropy(head.linear(pooled), both, weight=weight).backward()
            probe.step()
        tuned = [p for layer in net[FROZEN:] for p in layer.parameters()]
        opt = torch.optim.SGD(tuned, lr=lr, momentum=0.9, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(seed + k)
        losses = []
        for step in range(steps):
            idx = torch.randint(len(feats), (16,), generator=gen)
            f = (flipped if step % 2 else feats)[idx]
            loss = F.cross_entropy(net[FROZEN:](f), labels[idx], weight=weight)
            opt.zero_grad()
            loss.backward()
            # the detector's batch norms are folded into its convolutions, so nothing rescales
            # the gradients of layers 7-8: a small learning rate and a clipped norm keep it stable
            torch.nn.utils.clip_grad_norm_(tuned, 5.0)
            opt.step()
            losses.append(loss.item())
        net.eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": net.state_dict(), "class_names": list(spec.classes)}, path)
        print(f"copy {spec.name}: probe + {steps} fine-tuning steps in {time.monotonic() - t0:.0f}s "
              f"(loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f})", flush=True)


# ------------------------------------------------------------------ report

def family_report(out: Path) -> dict:
    """Per copy: label balance, accuracy against the detector's labels, and how varied its
    outputs are on the held-out frames (a degenerate model answers one class everywhere)."""
    report = {}
    base = torch.load(out / "base_yolov8n_cls.pt", weights_only=True)["state_dict"]
    for spec in FAMILY:
        data = load_camera(out, spec.camera)
        net = network(len(spec.classes))
        net.load_state_dict(torch.load(specialised_weights(out, spec), weights_only=True)["state_dict"])
        net.eval()
        labels = spec.label(data)
        rows = np.r_[np.arange(0, data.n_train, 4), np.arange(data.n_train, len(data.images))]
        with torch.no_grad():
            pred = torch.cat([net(normalise(data.images[rows[i:i + 32]])).argmax(1)
                              for i in range(0, len(rows), 32)]).numpy()
        labels = labels[rows]
        n_train = int((rows < data.n_train).sum())
        held = slice(n_train, None)
        hist = np.bincount(pred[held], minlength=len(spec.classes))
        drift = {}
        for name, w in net.state_dict().items():
            if name in base and w.dtype.is_floating_point and w.ndim > 1 and not name.startswith("9.linear."):
                stage = "layer" + name.split(".")[0]
                d = drift.setdefault(stage, [0.0, 0.0])
                d[0] += float((w - base[name]).norm() ** 2)
                d[1] += float(base[name].norm() ** 2)
        report[spec.name] = {
            "camera": spec.camera, "classes": list(spec.classes),
            "train_label_share": np.bincount(spec.label(data)[:data.n_train], minlength=len(spec.classes)).tolist(),
            "heldout_frames": int(len(pred[held])),
            "heldout_label_share": np.bincount(labels[held], minlength=len(spec.classes)).tolist(),
            "heldout_prediction_share": hist.tolist(),
            "heldout_majority_fraction": round(float(hist.max() / hist.sum()), 3),
            "heldout_accuracy_vs_detector": round(float((pred[held] == labels[held]).mean()), 3),
            "train_accuracy_vs_detector (every 4th frame)": round(float((pred[:n_train] == labels[:n_train]).mean()), 3),
            "relative_weight_change_from_base": {s: round((a / b) ** 0.5, 4) for s, (a, b) in drift.items() if b},
        }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO_ROOT / "var" / "family")
    p.add_argument("--base-epochs", type=int, default=10, help="epochs of the base head")
    p.add_argument("--copy-steps", type=int, default=150)
    p.add_argument("--copy-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stages", default="labels,base,copies,report")
    p.add_argument("--report", action="store_true", help="only print the family report")
    args = p.parse_args(argv)
    if not DETECTOR.exists():
        print(f"needs the shared detector at {DETECTOR}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stages = ["report"] if args.report else args.stages.split(",")
    t0 = time.monotonic()
    if "labels" in stages:
        stage_labels(args.out)
    if "base" in stages:
        stage_base(args.out, args.base_epochs, args.seed)
    if "copies" in stages:
        stage_copies(args.out, args.copy_steps, args.copy_lr, args.seed)
    if "report" in stages:
        report = family_report(args.out)
        (args.out / "family_report.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
    print(f"done in {time.monotonic() - t0:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
