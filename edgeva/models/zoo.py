"""The model zoo: names, and `build_model` which turns a name (+ optional weights) into a ZooModel."""
from __future__ import annotations

import logging
from typing import Optional

import torch

from .base import TorchZooModel, ZooModel
from .device import resolve_device
from .errors import UnknownModelError
from .torchvision_zoo import TORCHVISION_SPECS
from .ultralytics_zoo import YOLO_NAMES
from .yolo_classifier import YOLO_CLASSIFIER_NAMES

log = logging.getLogger(__name__)

ZOO_KINDS: dict[str, str] = {
    **{name: "detector" for name in YOLO_NAMES},
    **{name: "classifier" for name in YOLO_CLASSIFIER_NAMES},
    **{name: spec.kind for name, spec in TORCHVISION_SPECS.items()},
}


def zoo_names() -> list[str]:
    return list(ZOO_KINDS)


def zoo_kind(name: str) -> str:
    _check_name(name)
    return ZOO_KINDS[name]


def default_input_size(name: str) -> int:
    """The network input size a zoo model runs at unless a query sets one."""
    _check_name(name)
    if name in YOLO_NAMES:
        from .ultralytics_zoo import INPUT_SIZE

        return INPUT_SIZE
    if name in YOLO_CLASSIFIER_NAMES:
        from .yolo_classifier import INPUT_SIZE as CLASSIFIER_INPUT_SIZE

        return CLASSIFIER_INPUT_SIZE
    return TORCHVISION_SPECS[name].input_size


def build_model(name: str, weights: Optional[str] = None, download: bool = False,
                device: str | torch.device = "cpu", place: bool = True) -> ZooModel:
    """Build a zoo model.

    weights=None, download=False: the architecture with random weights (never touches the network).
    weights=<path>: a torchvision state dict (.pt/.pth, bare or under 'state_dict'/'model'),
      an ultralytics .pt checkpoint, or an ultralytics export (directory or file; `is_torch` False).
    download=True: the library's own named weights (torchvision "DEFAULT" or an enum name such as
      "IMAGENET1K_V2"; ultralytics "<name>.pt") when `weights` is not an existing file.
    The network is built on the host; `place=True` then moves it to `device`. With
    `place=False` it stays on the host (for a memory manager to load under its budget) while
    `model.device` already names where it will run.
    Raises ModelLoadError (UnknownModelError for a name not in the zoo).
    """
    _check_name(name)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    weights = str(weights) if weights is not None else None
    if name in YOLO_NAMES:
        from .ultralytics_zoo import build_ultralytics

        model = build_ultralytics(name, weights, download, dev)
    elif name in YOLO_CLASSIFIER_NAMES:
        from .yolo_classifier import build_yolo_classifier

        model = build_yolo_classifier(name, weights, download, dev)
    else:
        from .torchvision_zoo import build_torchvision

        model = build_torchvision(name, weights, download, dev)
    if place and isinstance(model, TorchZooModel):
        model.place()
    log.debug("built %r", model)
    return model


def _check_name(name: str) -> None:
    if name not in ZOO_KINDS:
        raise UnknownModelError(f"unknown model {name!r}; the zoo has: {', '.join(ZOO_KINDS)}")
