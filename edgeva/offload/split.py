"""Split execution of torchvision classifiers at their top-level children.

A classifier's top-level children, run in order (flattening before the first fully connected
block, as torchvision's own forward does), reproduce its forward pass. `split_at = k` puts
children [0, k) on the daemon (the head) and [k, n) on the worker (the tail); the worker then
applies the same softmax as `TorchvisionClassifier`, so the output is the usual ClassProbs.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from edgeva.models.base import ZooModel
from edgeva.models.outputs import ClassProbs
from edgeva.models.preprocess import resize_normalise

# Architectures whose forward is exactly "children in order, flatten before the classifier".
SPLITTABLE = ("resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "vgg16", "alexnet")


class SplitError(ValueError):
    pass


def _needs_flatten(block: nn.Module) -> bool:
    """True when the block's first weighted layer is fully connected (it expects N x features)."""
    for m in block.modules():
        if isinstance(m, nn.Linear):
            return True
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            return False
    return False


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
        self.blocks: list[tuple[str, nn.Module]] = list(model.module.named_children())
        self._flatten = [_needs_flatten(b) for _, b in self.blocks]

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def block_names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def check_split(self, split_at: int) -> None:
        if not 0 <= split_at <= self.num_blocks:
            raise SplitError(f"{self.model.name}: split_at must be within [0, {self.num_blocks}], got {split_at}")

    def head(self, images: Sequence[np.ndarray], split_at: int) -> torch.Tensor:
        """Preprocess and run blocks [0, split_at) on the model's device; a CPU float32 tensor."""
        self.check_split(split_at)

        def head() -> torch.Tensor:
            with torch.inference_mode():
                x = resize_normalise(list(images), self.model.input_size).to(self.model.device)
                return self._run(x, 0, split_at).float().cpu().contiguous()

        return self._run_head(head)

    def tail(self, activations: torch.Tensor, split_at: int) -> list[ClassProbs]:
        """Run blocks [split_at, n) and the softmax: one ClassProbs per batch row."""
        self.check_split(split_at)
        with torch.inference_mode():
            logits = self._run(activations.to(self.model.device), split_at, self.num_blocks)
            if logits.ndim != 2:
                raise SplitError(f"{self.model.name}: blocks from {split_at} gave shape {tuple(logits.shape)}, "
                                 "expected (batch, classes)")
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        return [ClassProbs(p) for p in probs]

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        module = self.model.module
        if module is not None and module.training:
            module.eval()
        for (_, block), flatten in zip(self.blocks[start:stop], self._flatten[start:stop]):
            if flatten and x.ndim > 2:
                x = torch.flatten(x, 1)
            x = block(x)
        return x
