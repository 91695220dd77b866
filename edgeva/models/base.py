"""The interface every zoo model offers to the executor, tasks and merger."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .outputs import Output
from .preprocess import check_images

ModelKind = Literal["detector", "classifier"]


class ZooModel(ABC):
    """A built model: frames in (BGR uint8), `Detections` or `ClassProbs` out.

    `module` is the torch module when `is_torch` (what merging and memory management work
    on); exported models (OpenVINO, ONNX...) run through their own runtime and have none.
    """

    name: str
    kind: ModelKind
    class_names: list[str]
    input_size: int          # detectors: the long side of the network input; classifiers: the square side
    is_torch: bool
    weights: Optional[str]   # where the weights came from; None: random initialisation
    min_score: float = 0.25  # detections below this are dropped (tasks filter further)

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @property
    def module(self) -> Optional[nn.Module]:
        return None

    def to(self, device: torch.device | str) -> "ZooModel":
        device = torch.device(device)
        if self.module is not None:
            self.module.to(device)
        self.device = device
        return self

    def predict(self, images: Sequence[np.ndarray]) -> list[Output]:
        """One output per image; the batch goes through the network in one forward."""
        images = list(images)
        if not images:
            return []
        check_images(images)
        with torch.inference_mode():
            return self._predict(images)

    @abstractmethod
    def _predict(self, images: list[np.ndarray]) -> list[Output]: ...

    def __repr__(self) -> str:
        source = self.weights or "random init"
        return (f"<{type(self).__name__} {self.name} {self.kind} {len(self.class_names)} classes "
                f"on {self.device}, weights: {source}>")


class TorchZooModel(ZooModel):
    """A zoo model whose network is a torch module: what merging and memory management work on."""

    is_torch = True

    def __init__(self, device: torch.device, module: nn.Module) -> None:
        super().__init__(device)
        self._module = module.eval().to(device)

    @property
    def module(self) -> nn.Module:
        return self._module

    def replace_module(self, module: nn.Module) -> None:
        """Run another module of the same architecture (e.g. a merged one with shared layers)."""
        self._module = module.eval().to(self.device)

    def predict(self, images: Sequence[np.ndarray]) -> list[Output]:
        if self._module.training:   # distillation may have left it in train mode
            self._module.eval()
        return super().predict(images)
