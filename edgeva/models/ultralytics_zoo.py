"""ultralytics YOLO detectors: built from the architecture yaml that ships inside the package,
from a .pt checkpoint, or from an export (OpenVINO/ONNX/... directory or file)."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from .base import TorchZooModel, ZooModel
from .coco import COCO_NAMES
from .errors import ModelLoadError
from .offline import allow_downloads, import_ultralytics
from .outputs import Detections, Output
from .preprocess import letterbox_batch, letterbox_tensor

log = logging.getLogger(__name__)

YOLO_NAMES = ("yolov8n", "yolov8s", "yolo11n", "yolo11s")
INPUT_SIZE = 640
NMS_IOU = 0.7  # ultralytics' predict default


def build_ultralytics(name: str, weights: Optional[str], download: bool, device: torch.device) -> ZooModel:
    import_ultralytics()
    from ultralytics import YOLO

    if weights is None and not download:
        yolo = YOLO(f"{name}.yaml", task="detect")  # architecture only: random weights
        return UltralyticsTorchDetector(name, yolo.model, None, device)
    if weights is None or not Path(weights).expanduser().exists():
        if not download:
            raise ModelLoadError(f"weights file {weights} does not exist", path=weights)
        return _download(name, weights or f"{name}.pt", device)
    path = Path(weights).expanduser().resolve()
    if path.suffix == ".pt":
        return _from_checkpoint(name, path, device)
    return _from_export(name, path, device)


def _download(name: str, asset: str, device: torch.device) -> ZooModel:
    from ultralytics import YOLO

    try:
        with allow_downloads():
            yolo = YOLO(asset, task="detect")
    except Exception as exc:
        raise ModelLoadError(f"{name}: could not download ultralytics weights {asset!r} "
                             f"({type(exc).__name__}: {_first_line(exc)}); offline machines need a weights file",
                             path=asset) from None
    return UltralyticsTorchDetector(name, yolo.model, f"ultralytics:{asset}", device)


def _from_checkpoint(name: str, path: Path, device: torch.device) -> ZooModel:
    from ultralytics import YOLO

    try:
        # An ultralytics checkpoint pickles the model object itself, so loading it runs
        # unpickling: only load checkpoints you trust.
        yolo = YOLO(str(path), task="detect")
    except Exception as exc:
        raise ModelLoadError(f"weights file {path} is not an ultralytics checkpoint "
                             f"({type(exc).__name__}: {_first_line(exc)})", path=str(path)) from None
    module = yolo.model
    if not isinstance(module, nn.Module):
        raise ModelLoadError(f"weights file {path} holds no ultralytics model", path=str(path))
    _check_architecture(name, module, path)
    return UltralyticsTorchDetector(name, module, str(path), device)


def _check_architecture(name: str, module: nn.Module, path: Path) -> None:
    """Compare tensor shapes with the zoo architecture (built with the checkpoint's class count)."""
    from ultralytics.nn.tasks import DetectionModel

    nc = int(getattr(module, "yaml", {}).get("nc", 80))
    reference = DetectionModel(f"{name}.yaml", nc=nc, verbose=False)
    got, want = module.state_dict(), reference.state_dict()
    mismatched = [f"{k} {tuple(got[k].shape)} vs {tuple(v.shape)}" for k, v in want.items()
                  if k in got and got[k].shape != v.shape]
    missing = [k for k in want if k not in got]
    if mismatched or missing or len(got) != len(want):
        detail = mismatched[:2] or missing[:2] or [f"{len(got)} tensors vs {len(want)}"]
        raise ModelLoadError(f"weights file {path} does not fit {name}: "
                             f"{'; '.join(detail)} (wrong architecture?)", path=str(path))


def _from_export(name: str, path: Path, device: torch.device) -> ZooModel:
    from ultralytics import YOLO

    if path.is_dir() and not (path / "metadata.yaml").exists():
        raise ModelLoadError(f"weights {path} is a directory without metadata.yaml; "
                             f"expected an ultralytics export directory", path=str(path))
    try:
        yolo = YOLO(str(path), task="detect")
    except Exception as exc:
        raise ModelLoadError(f"weights {path} is not a loadable ultralytics model "
                             f"({type(exc).__name__}: {_first_line(exc)})", path=str(path)) from None
    metadata = _read_metadata(path)
    described = str(metadata.get("description", ""))
    other = [n for n in YOLO_NAMES if n != name and n.lower() in described.lower().replace(" ", "")]
    if other and name.lower() not in described.lower():
        raise ModelLoadError(f"weights {path} is a {other[0]} export ({described!r}), not {name}", path=str(path))
    return UltralyticsExportDetector(name, yolo, metadata, str(path), device)


def _read_metadata(path: Path) -> dict[str, Any]:
    file = path / "metadata.yaml" if path.is_dir() else None
    if file is None or not file.exists():
        return {}
    import yaml

    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _class_names(names: Any, nc: int) -> list[str]:
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)]
    names = [str(n) for n in (names or [])]
    # Architecture yamls carry placeholder names ("0".."79"); an 80-class head is COCO.
    if nc == 80 and (len(names) != 80 or all(n.isdigit() for n in names)):
        return list(COCO_NAMES)
    return names if len(names) == nc else [str(i) for i in range(nc)]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().removeprefix("ERROR ❌️").strip()
    return text.splitlines()[0][:200] if text else "no details"


class UltralyticsTorchDetector(TorchZooModel):
    """Runs the DetectionModel directly (own letterbox, one forward, ultralytics NMS): the
    ultralytics predictor would fuse Conv+BN in place, changing the module merging works on."""

    kind = "detector"

    def __init__(self, name: str, module: nn.Module, weights: Optional[str], device: torch.device) -> None:
        super().__init__(device, module.float(), place=False)
        self.name, self.weights, self.input_size = name, weights, INPUT_SIZE
        nc = int(getattr(module, "nc", 0) or module.yaml.get("nc", 80))
        self.class_names = _class_names(getattr(module, "names", None), nc)
        self._stride = max(32, int(module.stride.max())) if hasattr(module, "stride") else 32

    def _predict(self, images: list[np.ndarray]) -> list[Output]:
        from ultralytics.utils.nms import non_max_suppression

        if self.device.type == "cuda":     # uint8 frames go up once; letterboxing runs on the device
            x, boxes_in = letterbox_tensor(images, self.input_size, self._stride, self.device)
        else:
            x, boxes_in = letterbox_batch(images, self.input_size, self._stride)
        raw = self._module(self.input_layout(x))
        raw = raw[0] if isinstance(raw, (list, tuple)) else raw
        raw = raw.float()
        per_image = non_max_suppression(raw, conf_thres=self.min_score, iou_thres=NMS_IOU,
                                        nc=len(self.class_names), max_det=300)
        outputs: list[Output] = []
        for det, letterbox, img in zip(per_image, boxes_in, images):
            det = det.float().cpu().numpy()
            outputs.append(Detections(letterbox.boxes_to_image(det[:, :4], img.shape[:2]),
                                      det[:, 4].astype(np.float32), det[:, 5].astype(np.int64)))
        return outputs


class UltralyticsExportDetector(ZooModel):
    """An exported model run by its own runtime through ultralytics' predictor; no torch
    module exists, so nothing can be merged or swapped layer by layer."""

    kind = "detector"
    is_torch = False

    def __init__(self, name: str, yolo: Any, metadata: dict[str, Any], weights: str, device: torch.device) -> None:
        super().__init__(device)
        self.name, self.weights, self._yolo = name, weights, yolo
        imgsz = metadata.get("imgsz", INPUT_SIZE)
        self.input_size = int(max(imgsz) if isinstance(imgsz, (list, tuple)) else imgsz)
        names = metadata.get("names") or getattr(yolo, "names", None) or {}
        self.class_names = _class_names(names, len(names) if names else 80)

    def _predict(self, images: list[np.ndarray]) -> list[Output]:
        results = self._yolo.predict(images, imgsz=self.input_size, conf=self.min_score, iou=NMS_IOU,
                                     device=str(self.device), verbose=False)
        outputs: list[Output] = []
        for r in results:
            b = r.boxes
            outputs.append(Detections(b.xyxy.float().cpu().numpy().astype(np.float32),
                                      b.conf.float().cpu().numpy().astype(np.float32),
                                      b.cls.cpu().numpy().astype(np.int64)))
        return outputs
