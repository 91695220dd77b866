"""Split execution of torchvision classifiers at a split point (`edgeva.models.splits`).

`split_at = k` (the split point's index: layers before the cut) puts the chain's layers
[0, k) on the daemon (the head) and [k, n) on the worker (the tail); the worker then applies
the same softmax as `WholeFrameClassifier`, so the output is the usual ClassProbs. Both ends
build the chain the same way, so the index on the wire means the same cut on both.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from edgeva.models.base import ZooModel
from edgeva.models.outputs import ClassProbs
from edgeva.models.preprocess import normalisation, resize_normalise
from edgeva.models.splits import (SplitError, SplitSpec, chain_layers, needs_flatten, resolve_split, run_layer,
                                  split_point_names)

# Architectures whose forward is exactly the chain of `edgeva.models.splits`.
SPLITTABLE = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "vgg16", "alexnet")

__all__ = ["SPLITTABLE", "SplitError", "SplitModel"]


class SplitModel:
    """Head and tail of one zoo classifier; shares the model's module, adds no weights."""

    def __init__(self, model: ZooModel, run: Optional[Callable[[Callable[[], Any]], Any]] = None):
        """`run` wraps the head's forward: the local executor's `call`, so that under a memory
        budget the head runs inside the memory manager (weights on the device, no eviction
        racing it), never beside it."""
        if model.name not in SPLITTABLE or model.kind != "classifier" or model.module is None:
            raise SplitError(f"{model.name} cannot be split; splittable models: {', '.join(SPLITTABLE)}")
        self.model = model
        self._run_head = run or (lambda fn: fn())
        self.layers = chain_layers(model.module)
        self.split_points = split_point_names(self.layers)
        self._flatten = [needs_flatten(layer) for _, layer in self.layers]

    def running_in(self, run: Callable[[Callable[[], Any]], Any]) -> "SplitModel":
        """The same split with its head run through `run` (an executor's `call`)."""
        return SplitModel(self.model, run=run)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def resolve(self, point: SplitSpec) -> int:
        """The index of a split point given by index or by name (e.g. a plan's `layer3.5`)."""
        return resolve_split(point, self.split_points, self.model.name)

    def check_split(self, split_at: int) -> None:
        if isinstance(split_at, bool) or not isinstance(split_at, int) or not 0 <= split_at <= self.num_layers:
            raise SplitError(f"{self.model.name}: split_at must be within [0, {self.num_layers}], got {split_at!r}")

    def head(self, images: Sequence[np.ndarray], split_at: int) -> torch.Tensor:
        """Preprocess and run layers [0, split_at) on the model's device; a CPU float32 tensor."""
        self.check_split(split_at)

        def head() -> torch.Tensor:
            with torch.inference_mode():
                x = resize_normalise(list(images), self.model.input_size, *normalisation(self.model)).to(self.model.device)
                return self._run(x, 0, split_at).float().cpu().contiguous()

        return self._run_head(head)

    def tail(self, activations: torch.Tensor, split_at: int) -> list[ClassProbs]:
        """Run layers [split_at, n) and the softmax: one ClassProbs per batch row."""
        self.check_split(split_at)
        with torch.inference_mode():
            logits = self._run(activations.to(self.model.device), split_at, self.num_layers)
            if logits.ndim != 2:
                raise SplitError(f"{self.model.name}: layers from {split_at} gave shape {tuple(logits.shape)}, "
                                 "expected (batch, classes)")
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return [ClassProbs(p) for p in probs]

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        module = self.model.module
        if module is not None and module.training:
            module.eval()
        for (_, layer), flatten in zip(self.layers[start:stop], self._flatten[start:stop]):
            x = run_layer(layer, x, flatten)
        return x
