"""The interface every zoo model offers to the executor, tasks and merger."""
from __future__ import annotations

from abc import ABC, abstractmethod
import contextlib
from typing import Any, Literal, Optional, Sequence

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
    `device` is where inputs go and the network runs; a torch module may still be on the host
    (built there, not `place`d yet) when a memory manager is to put its weights on the device.
    `autocast_dtype` (float16/bfloat16) runs the forward under autocast; `precision` records
    the check that chose it.
    """

    name: str
    kind: ModelKind
    class_names: list[str]
    input_size: int          # detectors: the long side of the network input; classifiers: the square side
    is_torch: bool
    weights: Optional[str]   # where the weights came from; None: random initialisation
    min_score: float = 0.25  # detections below this are dropped (tasks filter further)

    autocast_dtype: Optional[torch.dtype] = None
    precision: Any = None    # PrecisionChoice of the load-time check, when one ran

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
        with torch.inference_mode(), self._autocast():
            return self._predict(images)

    def _autocast(self) -> Any:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    @abstractmethod
    def _predict(self, images: list[np.ndarray]) -> list[Output]: ...

    def __repr__(self) -> str:
        source = self.weights or "random init"
        return (f"<{type(self).__name__} {self.name} {self.kind} {len(self.class_names)} classes "
                f"on {self.device}, weights: {source}>")


class TorchZooModel(ZooModel):
    """A zoo model whose network is a torch module: what merging and memory management work on."""

    is_torch = True

    def __init__(self, device: torch.device, module: nn.Module, place: bool = True) -> None:
        super().__init__(device)
        self._module = module.eval()
        if place:
            self.place()

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def channels_last(self) -> bool:
        """NHWC convolutions: faster with cuDNN (tensor cores), slower on most CPUs."""
        return self.device.type == "cuda"

    def prepare_layout(self) -> None:
        """Put the weights in the memory format the device runs fastest, where they are."""
        if self.channels_last:
            self._module.to(memory_format=torch.channels_last)

    def place(self) -> "TorchZooModel":
        """Move the weights to `device` (without a memory budget; with one the memory manager
        moves them, block by block)."""
        self.prepare_layout()
        self._module.to(self.device)
        return self

    def to_host(self) -> "TorchZooModel":
        """Move the weights back to the host; `device` still names where the model runs."""
        self._module.to("cpu")
        return self

    def on_device(self) -> bool:
        return all(t.device == self.device or (t.device.type == self.device.type and self.device.index is None)
                   for t in list(self._module.parameters()) + list(self._module.buffers()))

    def input_layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def replace_module(self, module: nn.Module, place: bool = True) -> None:
        """Run another module of the same architecture (e.g. a merged one with shared layers)."""
        self._module = module.eval()
        if place:
            self.place()

    def predict(self, images: Sequence[np.ndarray]) -> list[Output]:
        if self._module.training:   # distillation may have left it in train mode
            self._module.eval()
        return super().predict(images)
