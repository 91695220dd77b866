"""Label-free retraining targets: how to feed frames to a model's torch module, which of its
outputs to match, and the loss that matches a merged model to its frozen original."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.base import ZooModel
from ..models.preprocess import letterbox_batch, resize_normalise


class DistillAdapter(Protocol):
    def ready_for_grad(self, module: nn.Module) -> None: ...
    def inputs(self, frames: list[np.ndarray]) -> torch.Tensor: ...
    def head(self, raw: object) -> torch.Tensor: ...
    def outputs(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor: ...
    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor: ...


@dataclass
class ClassifierAdapter:
    """Soft-label distillation: KL between temperature-softened class distributions."""

    input_size: int
    temperature: float = 2.0

    def ready_for_grad(self, module: nn.Module) -> None:
        pass

    def inputs(self, frames: list[np.ndarray]) -> torch.Tensor:
        return resize_normalise(frames, self.input_size)

    def head(self, raw: object) -> torch.Tensor:
        return getattr(raw, "logits", raw).float()

    def outputs(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.head(module(x))

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        return F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1),
                        reduction="batchmean") * t * t


@dataclass
class UltralyticsAdapter:
    """Dense distillation of the decoded head: class scores everywhere, boxes where the
    original is confident (its best class score weights each anchor's box error)."""

    input_size: int
    stride: int

    def ready_for_grad(self, module: nn.Module) -> None:
        """`predict` runs under torch.inference_mode, and the Detect head caches its anchors and
        strides from the last forward at an input shape; cached inference tensors cannot enter
        a differentiable forward, so they are dropped and recomputed."""
        for m in module.modules():
            anchors = getattr(m, "anchors", None)
            if isinstance(anchors, torch.Tensor) and anchors.is_inference() and hasattr(m, "shape"):
                m.shape = None

    def inputs(self, frames: list[np.ndarray]) -> torch.Tensor:
        return letterbox_batch(frames, self.input_size, self.stride)[0]

    def head(self, raw: object) -> torch.Tensor:
        return (raw[0] if isinstance(raw, (tuple, list)) else raw).float()

    def outputs(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.head(module(x))

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        s_box, s_cls = student[:, :4] / self.input_size, student[:, 4:]
        t_box, t_cls = teacher[:, :4] / self.input_size, teacher[:, 4:]
        confidence = t_cls.max(dim=1).values
        box = ((s_box - t_box).abs().sum(dim=1) * confidence).sum() / confidence.sum().clamp_min(1e-6)
        cls = ((s_cls - t_cls) ** 2).sum(dim=1).mean() * 10.0
        return cls + box


def adapter_for(model: ZooModel) -> Optional[DistillAdapter]:
    """None when the model's outputs cannot be distilled here (exports; torchvision detectors,
    whose eval forward returns post-NMS boxes)."""
    if not model.is_torch or model.module is None:
        return None
    if model.kind == "classifier":
        return ClassifierAdapter(model.input_size)
    if hasattr(model, "_stride"):  # ultralytics DetectionModel wrapper
        return UltralyticsAdapter(model.input_size, int(getattr(model, "_stride")))
    return None


@dataclass
class TeacherCache:
    """The frozen original's outputs on the training frames, computed once before any change."""

    inputs: torch.Tensor
    targets: torch.Tensor

    @classmethod
    def build(cls, adapter: DistillAdapter, module: nn.Module, frames: list[np.ndarray], device: torch.device,
              batch: int = 16) -> "TeacherCache":
        x = adapter.inputs(frames)
        outs = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                outs.append(adapter.outputs(module, x[i:i + batch].to(device)).cpu())
        return cls(x, torch.cat(outs))
