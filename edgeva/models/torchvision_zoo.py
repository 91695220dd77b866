"""torchvision classifiers and detectors, built from architecture (weights=None) plus an
optional state dict file, or with the library's own named weights when downloads are allowed."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torchvision
from torch import nn

from .base import TorchZooModel, ZooModel
from .checkpoints import load_into, read_state_dict
from .coco import COCO91_TO_80, COCO_NAMES
from .errors import ModelLoadError
from .offline import network_timeout
from .outputs import ClassProbs, Detections, Output
from .preprocess import (IMAGENET_MEAN, IMAGENET_STD, resize_normalise, resize_normalise_tensor, to_rgb_tensors,
                         upload_frames)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TorchvisionSpec:
    kind: str                 # classifier | detector
    head_key: str             # the state-dict key whose first dim is the number of classes
    default_classes: int
    input_size: int
    build_kwargs: dict[str, Any] = field(default_factory=dict)


TORCHVISION_SPECS: dict[str, TorchvisionSpec] = {
    "resnet18": TorchvisionSpec("classifier", "fc.weight", 1000, 224),
    "resnet50": TorchvisionSpec("classifier", "fc.weight", 1000, 224),
    "vgg16": TorchvisionSpec("classifier", "classifier.6.weight", 1000, 224),
    "alexnet": TorchvisionSpec("classifier", "classifier.6.weight", 1000, 224),
    "mobilenet_v3_small": TorchvisionSpec("classifier", "classifier.3.weight", 1000, 224),
    "mobilenet_v3_large": TorchvisionSpec("classifier", "classifier.3.weight", 1000, 224),
    # init_weights=False: skips scipy truncated-normal init (seconds) that any weights replace.
    "inception_v3": TorchvisionSpec("classifier", "fc.weight", 1000, 299, {"init_weights": False}),
    "fasterrcnn_resnet50_fpn": TorchvisionSpec("detector", "roi_heads.box_predictor.cls_score.weight", 91, 800,
                                               {"weights_backbone": None}),
}


def build_torchvision(name: str, weights: Optional[str], download: bool, device: torch.device) -> ZooModel:
    spec = TORCHVISION_SPECS[name]
    if weights is not None and (not download or Path(weights).expanduser().exists()):
        return _from_state_dict(name, spec, Path(weights).expanduser(), device)
    if download:
        return _from_library(name, spec, weights or "DEFAULT", device)
    module = _architecture(name, spec, spec.default_classes, aux_logits=True, transform_input=False)
    return _wrap(name, spec, module, _default_names(name, spec), None, device)


def _architecture(name: str, spec: TorchvisionSpec, num_classes: int, *, aux_logits: bool,
                  transform_input: bool) -> nn.Module:
    kwargs = dict(spec.build_kwargs)
    if name == "inception_v3":
        kwargs.update(aux_logits=aux_logits, transform_input=transform_input)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)


def _from_state_dict(name: str, spec: TorchvisionSpec, path: Path, device: torch.device) -> ZooModel:
    state, stored_names = read_state_dict(path)
    head = state.get(spec.head_key)
    num_classes = int(head.shape[0]) if head is not None and head.ndim >= 1 else spec.default_classes
    # torchvision's released inception weights expect its TF-style input transform.
    module = _architecture(name, spec, num_classes,
                           aux_logits=any(k.startswith("AuxLogits.") for k in state),
                           transform_input=True)
    load_into(module, state, path, name)
    names = _names_for(name, spec, num_classes, stored_names)
    return _wrap(name, spec, module, names, str(path), device)


def _from_library(name: str, spec: TorchvisionSpec, weights_name: str, device: torch.device) -> ZooModel:
    try:
        enum = torchvision.models.get_model_weights(name)
        chosen = enum.DEFAULT if weights_name == "DEFAULT" else enum.verify(weights_name.split(".")[-1])
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"{name}: unknown torchvision weights {weights_name!r} ({exc})") from None
    try:
        with network_timeout(60.0):
            module = torchvision.models.get_model(name, weights=chosen)
    except Exception as exc:  # urllib, hash and unpickling errors all mean the same here
        raise ModelLoadError(f"{name}: could not download torchvision weights {chosen} "
                             f"({type(exc).__name__}: {exc}); offline machines need a weights file") from None
    names = list(chosen.meta.get("categories", []))
    names = [n for n in names if n not in ("__background__", "N/A")] if spec.kind == "detector" else names
    return _wrap(name, spec, module, names or _default_names(name, spec), f"torchvision:{chosen}", device)


def _default_names(name: str, spec: TorchvisionSpec) -> list[str]:
    if spec.kind == "detector":
        return list(COCO_NAMES)
    try:
        # The category list ships inside torchvision's code; reading it downloads nothing.
        return list(torchvision.models.get_model_weights(name).DEFAULT.meta["categories"])
    except Exception:
        return [str(i) for i in range(spec.default_classes)]


def _names_for(name: str, spec: TorchvisionSpec, num_classes: int, stored: Optional[list[str]]) -> list[str]:
    real_classes = num_classes - 1 if spec.kind == "detector" else num_classes  # detectors: 0 is background
    if stored is not None:
        if len(stored) == real_classes:
            return stored
        if spec.kind == "detector" and len(stored) == num_classes:
            return stored[1:]
        log.warning("%s: checkpoint names %d classes but the head has %d; using indices",
                    name, len(stored), real_classes)
    if num_classes == spec.default_classes:
        return _default_names(name, spec)
    return [str(i) for i in range(real_classes)]


def _wrap(name: str, spec: TorchvisionSpec, module: nn.Module, names: list[str], weights: Optional[str],
          device: torch.device) -> ZooModel:
    cls = TorchvisionDetector if spec.kind == "detector" else WholeFrameClassifier
    return cls(name, module, names, spec.input_size, weights, device)


class WholeFrameClassifier(TorchZooModel):
    """A whole-frame classifier: the frame stretched to input_size, normalised by `mean`/`std`
    (ImageNet's unless the architecture was trained otherwise), softmax of the logits."""

    kind = "classifier"

    def __init__(self, name: str, module: nn.Module, class_names: list[str], input_size: int,
                 weights: Optional[str], device: torch.device) -> None:
        super().__init__(device, module, place=False)
        self.name, self.class_names, self.input_size, self.weights = name, class_names, input_size, weights
        self.mean: tuple[float, ...] = IMAGENET_MEAN
        self.std: tuple[float, ...] = IMAGENET_STD

    def _predict(self, images: list[np.ndarray]) -> list[Output]:
        if self.device.type == "cuda":     # uint8 frames go up once; resizing runs on the device
            x = resize_normalise_tensor(images, self.input_size, self.device, self.mean, self.std)
        else:
            x = resize_normalise(images, self.input_size, self.mean, self.std)
        logits = self._module(self.input_layout(x))
        logits = getattr(logits, "logits", logits)  # inception in train mode returns a named tuple
        probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return [ClassProbs(p) for p in probs]


class TorchvisionDetector(TorchZooModel):
    kind = "detector"

    def __init__(self, name: str, module: nn.Module, class_names: list[str], input_size: int,
                 weights: Optional[str], device: torch.device) -> None:
        super().__init__(device, module, place=False)
        self.name, self.class_names, self.input_size, self.weights = name, class_names, input_size, weights
        # Label 0 is background; a 91-label COCO head uses the original sparse category ids.
        predictor = getattr(getattr(module, "roi_heads", None), "box_predictor", None)
        num_labels = getattr(getattr(predictor, "cls_score", None), "out_features", len(COCO91_TO_80))
        coco91 = num_labels == len(COCO91_TO_80) and list(class_names) == list(COCO_NAMES)
        mapping = COCO91_TO_80 if coco91 else (-1, *range(len(class_names)))
        self._label_to_class = np.asarray(mapping, dtype=np.int64)

    def _predict(self, images: list[np.ndarray]) -> list[Output]:
        if self.device.type == "cuda":
            inputs = [f.permute(2, 0, 1).flip(0).float().div_(255.0) for f in upload_frames(images, self.device)]
        else:
            inputs = to_rgb_tensors(images)
        results = self._module(inputs)
        outputs: list[Output] = []
        for r in results:
            labels = r["labels"].cpu().numpy()
            scores = r["scores"].float().cpu().numpy()
            class_ids = self._label_to_class[labels.clip(0, len(self._label_to_class) - 1)]
            keep = (scores >= self.min_score) & (class_ids >= 0)
            outputs.append(Detections(r["boxes"].float().cpu().numpy()[keep].astype(np.float32),
                                      scores[keep].astype(np.float32), class_ids[keep]))
        return outputs
