"""Split points: one definition for the profiler, the planner's profiles, plan files and
split execution.

A splittable model's forward is a chain of layers: its top-level children in order, each
nested ``nn.Sequential`` of several blocks (ResNet's ``layer1``..``layer4``, MobileNet's and
VGG's ``features``) expanded one level unless it is the classifier head, with a flatten
before the first fully connected layer as torchvision's forward does. A *split point* is a
cut in that chain, named by the layer it follows (``input``: before the first layer); its
index is the number of layers before it, 0..len(chain). ``edgeva profile`` names the split
points of a hierarchy's model profiles this way, a plan file carries the chosen name
(``split_name``), and the daemon cuts the model after that same layer.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

INPUT = "input"

SplitSpec = Union[int, str]     # a split point by index (layers before the cut) or by name


class SplitError(ValueError):
    pass


def chain_layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose composition is the model's forward, named by their module path."""
    layers: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1 and not _is_head(child):
            layers.extend((f"{name}.{sub}", m) for sub, m in child.named_children())
        else:
            layers.append((name, child))
    return layers


def _is_head(seq: nn.Sequential) -> bool:
    return any(isinstance(m, nn.Linear) for m in seq.children())


def needs_flatten(layer: nn.Module) -> bool:
    """True when the layer's first weighted layer is fully connected (it expects N x features)."""
    for m in layer.modules():
        if isinstance(m, nn.Linear):
            return True
        if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)):
            return False
    return False


def run_layer(layer: nn.Module, x: torch.Tensor, flatten: bool) -> torch.Tensor:
    if flatten and x.dim() > 2:
        x = torch.flatten(x, 1)
    return layer(x)


def split_point_names(layers: Sequence[tuple[str, nn.Module]]) -> list[str]:
    """The name of each split point, by index: 'input', then the layer each cut follows."""
    return [INPUT] + [name for name, _ in layers]


def resolve_split(point: SplitSpec, names: Sequence[str], model: str = "the model") -> int:
    """The index of a split point given by index or name (see split_point_names)."""
    if isinstance(point, bool):
        raise SplitError(f"{model}: a split point is a layer name or an index, got {point!r}")
    if isinstance(point, int):
        if not 0 <= point < len(names):
            raise SplitError(f"{model}: split index must be within [0, {len(names) - 1}], got {point}")
        return point
    if point not in names:
        raise SplitError(f"{model} has no split point {point!r}; its split points: {', '.join(names)}")
    return names.index(point)
