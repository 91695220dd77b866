"""YOLO classifiers (ultralytics' `yolov8n-cls` architecture) as plain torch modules.

The network is ultralytics' own layers in an `nn.Sequential` whose last layer returns logits
(ultralytics' Classify head returns softmax probabilities, or a tuple, outside training), so
the merger can run it block by block like a torchvision classifier. Its backbone (layers 0-8)
has the shapes of the YOLOv8n detector's first nine layers, which is how a classifier family
starts from a real pretrained detector (`tools/make_family.py`). Weights are a state dict file
with the class names beside it, read the same way as torchvision checkpoints. Inputs are the
whole frame stretched to input_size x input_size, RGB in [0, 1] without mean/std
normalisation, as the YOLO backbone was trained.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .base import ZooModel
from .checkpoints import load_into, read_state_dict
from .errors import ModelLoadError
from .offline import import_ultralytics
from .torchvision_zoo import WholeFrameClassifier

YOLO_CLASSIFIER_NAMES = ("yolov8n-cls",)
INPUT_SIZE = 224
HEAD_KEY = "9.linear.weight"
NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


class ClassifyLogits(nn.Module):
    """ultralytics' Classify head (1x1 conv, pool, dropout, linear) returning logits always."""

    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.conv, self.pool, self.drop, self.linear = head.conv, head.pool, head.drop, head.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.pool(self.conv(x)).flatten(1)))


def yolo_classifier_network(name: str, num_classes: int) -> nn.Sequential:
    import_ultralytics()
    from ultralytics.nn.tasks import ClassificationModel

    layers = list(ClassificationModel(f"{name}.yaml", nc=num_classes, verbose=False).model)
    return nn.Sequential(*layers[:-1], ClassifyLogits(layers[-1])).eval()


def build_yolo_classifier(name: str, weights: Optional[str], download: bool, device: torch.device) -> ZooModel:
    if weights is None:
        if download:
            raise ModelLoadError(f"{name}: edgeva has no downloadable weights for it; give a weights file")
        module = yolo_classifier_network(name, 1000)
        return _wrap(name, module, [str(i) for i in range(1000)], None, device)
    path = Path(weights).expanduser()
    state, names = read_state_dict(path)
    head = state.get(HEAD_KEY)
    if head is None or head.ndim != 2:
        raise ModelLoadError(f"weights file {path} does not fit {name}: no {HEAD_KEY} (wrong architecture?)",
                             path=str(path))
    module = yolo_classifier_network(name, int(head.shape[0]))
    load_into(module, state, path, name)
    if names is None or len(names) != head.shape[0]:
        names = [str(i) for i in range(head.shape[0])]
    return _wrap(name, module.eval(), names, str(path), device)


def _wrap(name: str, module: nn.Module, names: list[str], weights: Optional[str], device: torch.device) -> ZooModel:
    model = WholeFrameClassifier(name, module, names, INPUT_SIZE, weights, device)
    model.mean, model.std = NO_NORMALISATION
    return model
