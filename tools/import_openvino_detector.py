#!/usr/bin/env python
"""Turn an ultralytics OpenVINO INT8 export back into a PyTorch checkpoint.

No PyTorch weights can be downloaded here, but the real COCO detectors in ../shared/weights are
OpenVINO INT8 exports. Their IR keeps every convolution's weight as int8 values times a
per-channel scale (`Constant -> Convert -> Multiply`) and the folded batch-norm as the bias `Add`
after it, with the ultralytics module path as the node name (`/model.22/cv3.2/cv3.2.1/conv/Conv`).
This tool dequantises those constants and loads them into the same architecture built from its
yaml: the batch norms become identities (mean 0, variance 1 - eps, weight 1) carrying the folded
bias, so the result is an ordinary unfused ultralytics checkpoint that edgeva can run on CUDA,
fine-tune, merge and swap layer by layer.

The weights are the INT8 grid's values, not the original FP32 ones, and activations are no
longer quantised, so outputs differ slightly from the export (the tool prints the count
agreement with it on a clip when given --check-clip).

    .venv/bin/python tools/import_openvino_detector.py ../shared/weights/yolov8n_int8_openvino_model \\
        var/weights/yolov8n_from_int8.pt [--check-clip ../shared/videos/tune/...mp4]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


class ImportError_(ValueError):
    """The IR does not have the layout this tool understands."""


def _constant(node) -> np.ndarray:
    """Evaluate a weight-dequantisation subgraph made of constants."""
    kind = node.get_type_name()
    args = [node.input_value(i).get_node() for i in range(node.get_input_size())]
    if kind == "Constant":
        return node.get_data().astype(np.float32)
    if kind == "Convert":
        return _constant(args[0])
    if kind == "Multiply":
        return _constant(args[0]) * _constant(args[1])
    if kind == "Subtract":
        return _constant(args[0]) - _constant(args[1])
    if kind == "FakeQuantize":
        x, lo_in, hi_in, lo_out, hi_out = (_constant(a) for a in args)
        levels = node.get_levels() - 1
        q = np.round((np.clip(x, lo_in, hi_in) - lo_in) / (hi_in - lo_in) * levels)
        return q / levels * (hi_out - lo_out) + lo_out
    raise ImportError_(f"unexpected {kind} node {node.get_friendly_name()} in a weight subgraph")


def module_path(node_name: str) -> str:
    """'/model.22/cv3.2/cv3.2.1/conv/Conv/WithoutBiases' -> 'model.22.cv3.2.1.conv'.

    The exporter names each scope after the module's attribute path, and a ModuleList member's
    scope repeats its parent's prefix ('cv3.2' then 'cv3.2.1'), so a segment that extends the
    previous one replaces it."""
    segments: list[str] = []
    for seg in node_name.strip("/").split("/"):
        if seg in ("Conv", "WithoutBiases") or seg.startswith("fq_"):
            break
        if segments and seg.startswith(segments[-1] + "."):
            segments[-1] = seg
        else:
            segments.append(seg)
    return ".".join(segments)


def read_convolutions(xml: Path) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    import openvino as ov

    model = ov.Core().read_model(str(xml))
    convs: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    for op in model.get_ops():
        if op.get_type_name() != "Convolution":
            continue
        weight = _constant(op.input_value(1).get_node())
        bias = None
        for target in op.output(0).get_target_inputs():
            add = target.get_node()
            if add.get_type_name() == "Add":
                try:
                    bias = _constant(add.input_value(1).get_node()).reshape(-1)
                except ImportError_:
                    bias = None
        convs[module_path(op.get_friendly_name())] = (weight, bias)
    return convs


def build_checkpoint(export_dir: Path) -> nn.Module:
    from ultralytics.nn.modules import Conv
    from ultralytics.nn.tasks import DetectionModel
    import yaml

    export_dir = Path(export_dir)
    xmls = sorted(export_dir.glob("*.xml"))
    if len(xmls) != 1:
        raise ImportError_(f"{export_dir}: expected one .xml IR file, found {len(xmls)}")
    meta = yaml.safe_load((export_dir / "metadata.yaml").read_text()) if (export_dir / "metadata.yaml").exists() else {}
    arch = xmls[0].stem                       # yolov8n.xml -> yolov8n.yaml
    names = meta.get("names") or {}
    model = DetectionModel(f"{arch}.yaml", nc=len(names) or 80, verbose=False)
    convs = read_convolutions(xmls[0])
    modules = dict(model.named_modules())
    seen: set[str] = set()
    for path, (weight, bias) in convs.items():
        conv = modules.get(path)
        if not isinstance(conv, nn.Conv2d):
            raise ImportError_(f"IR convolution {path} has no Conv2d in {arch}")
        if tuple(conv.weight.shape) != weight.shape:
            raise ImportError_(f"{path}: IR weight {weight.shape} vs {tuple(conv.weight.shape)} in {arch}")
        conv.weight.data = torch.from_numpy(weight).clone()
        seen.add(path)
        owner = modules.get(path.rsplit(".", 1)[0]) if path.endswith(".conv") else None
        if isinstance(owner, Conv) and hasattr(owner, "bn"):
            if bias is None:   # a zero bias would load without complaint and detect nothing right
                raise ImportError_(f"{path}: no folded batch-norm bias found after the convolution in the IR")
            bn = owner.bn
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
            bn.weight.data.fill_(1.0)
            bn.bias.data = torch.from_numpy(bias).clone()
        elif bias is not None:
            if conv.bias is None:
                raise ImportError_(f"{path}: the IR has a bias the {arch} layer lacks")
            conv.bias.data = torch.from_numpy(bias).clone()
    missing = [n for n, m in modules.items() if isinstance(m, nn.Conv2d) and n not in seen]
    if missing:
        raise ImportError_(f"{len(missing)} convolutions of {arch} not in the IR, e.g. {missing[:3]}")
    if names:
        model.names = {int(k): str(v) for k, v in names.items()}
    model.args = {"imgsz": meta.get("imgsz", [640, 640])}
    return model.eval()


def save_checkpoint(model: nn.Module, out: Path, source: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "train_args": {}, "date": None, "version": None,
                "edgeva_source": f"dequantised from {source}"}, out)


def _counts(det, conf: float, names: list[str]) -> dict[str, int]:
    ids = det.class_ids[det.scores >= conf]
    return {names[c]: int((ids == c).sum()) for c in set(ids.tolist())}


def count_agreement(export_dir: Path, checkpoint: Path, clip: Path, frames: int, conf: float) -> float:
    """Mean strict count agreement (every COCO class) between the export and the checkpoint."""
    import cv2
    from edgeva.models import build_model
    from edgeva.models.tasks import CountTask

    arch = next(Path(export_dir).glob("*.xml")).stem      # the IR file is named after the architecture
    a, b = build_model(arch, str(export_dir)), build_model(arch, str(checkpoint))
    a.min_score = b.min_score = conf
    cap = cv2.VideoCapture(str(clip))
    scores = []
    for _ in range(frames):
        ok, frame = cap.read()
        if not ok:
            break
        ra, rb = a.predict([frame])[0], b.predict([frame])[0]
        scores.append(CountTask.agreement(_counts(ra, conf, a.class_names), _counts(rb, conf, b.class_names)))
    return float(np.mean(scores)) if scores else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export", type=Path, help="ultralytics OpenVINO export directory")
    p.add_argument("out", type=Path, help="checkpoint to write (.pt)")
    p.add_argument("--check-clip", type=Path)
    p.add_argument("--frames", type=int, default=100)
    args = p.parse_args(argv)
    try:
        model = build_checkpoint(args.export)
    except (ImportError_, OSError) as exc:
        print(f"import_openvino_detector: {exc}", file=sys.stderr)
        return 2
    save_checkpoint(model, args.out, args.export)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    if args.check_clip:
        agreement = count_agreement(args.export, args.out, args.check_clip, args.frames, 0.3)
        print(f"count agreement with the export on {args.frames} frames of {args.check_clip.name}: {agreement:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
