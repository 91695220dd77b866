"""Layers held as a shared base plus a small per-model residual: weight = base + delta * scale.

Copies fine-tuned from one base keep weights within a fraction of a percent of each other, so
what one copy's layer adds to another's is small and quantises well: `delta` is int8 per output
channel (symmetric, `scale` = the channel's largest |residual| / 127), a quarter of the float32
layer it replaces, and the function it computes differs from the copy's own by at most half a
quantisation step per weight. Where full sharing (one tensor for every member) changes answers
that retraining cannot bring back, a residual layer keeps the copy's function and still holds
most of its bytes in common (BitDelta, DeltaZip: a fleet of fine-tunes stored as one base and
compressed deltas).

A residual layer is the same `nn.Conv2d` / `nn.Linear` with its `weight` computed on each use
from three tensors it owns: `base` (the shared nn.Parameter, the same object in every member),
`delta` and `delta_scale` (its own buffers). The memory manager, checkpoints and `resident
bytes` see them as ordinary tensors: the base is one storage, the residuals one small storage
per member. The dense weight exists only while the layer runs.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

from .analysis import LayerRef

DELTA_DTYPE = torch.int8
DELTA_LEVELS = 127


class ResidualConv2d(nn.Conv2d):
    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.base + self.delta.to(self.base.dtype) * self.delta_scale


class ResidualLinear(nn.Linear):
    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.base + self.delta.to(self.base.dtype) * self.delta_scale


RESIDUAL_CLASS: dict[type[nn.Module], type[nn.Module]] = {nn.Conv2d: ResidualConv2d, nn.Linear: ResidualLinear}
PLAIN_CLASS = {v: k for k, v in RESIDUAL_CLASS.items()}


def supports_residual(layer: nn.Module) -> bool:
    return type(layer) in RESIDUAL_CLASS and isinstance(layer.weight, nn.Parameter)


def is_residual(layer: nn.Module) -> bool:
    return type(layer) in PLAIN_CLASS


def quantise(residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and the per-output-channel scale (shape [out, 1, ...]) of a residual."""
    flat = residual.detach().float().reshape(residual.shape[0], -1)
    largest = flat.abs().amax(dim=1)
    scale = torch.where(largest > 0, largest / DELTA_LEVELS, torch.ones_like(largest))
    codes = torch.round(flat / scale[:, None]).clamp(-DELTA_LEVELS, DELTA_LEVELS).to(DELTA_DTYPE)
    shape = (residual.shape[0],) + (1,) * (residual.dim() - 1)
    return codes.reshape(residual.shape), scale.reshape(shape).to(residual.dtype)


def attach(layer: nn.Module, base: nn.Parameter) -> None:
    """Make `layer` compute base + its quantised residual from `base` (its own weight is dropped)."""
    if not supports_residual(layer):
        raise TypeError(f"a {type(layer).__name__} layer cannot hold a residual (Conv2d and Linear can)")
    weight = layer.weight
    if weight.shape != base.shape:
        raise ValueError(f"residual base of shape {tuple(base.shape)} for a weight of shape {tuple(weight.shape)}")
    codes, scale = quantise(weight.detach() - base.detach())
    install(layer, base, codes, scale)


def install(layer: nn.Module, base: nn.Parameter, codes: torch.Tensor, scale: torch.Tensor) -> None:
    """Make a plain layer a residual layer with the given base, codes and scale (a bundle's)."""
    del layer.weight
    layer.__class__ = RESIDUAL_CLASS[type(layer)]
    layer.base = base
    layer.register_buffer("delta", codes.to(base.device))
    layer.register_buffer("delta_scale", scale.to(device=base.device, dtype=base.dtype))


def detach(layer: nn.Module, weight: nn.Parameter) -> None:
    """Undo `attach`: the layer holds `weight` (its own again) as a plain layer."""
    if not is_residual(layer):
        return
    del layer.base
    del layer.delta
    del layer.delta_scale
    layer.__class__ = PLAIN_CLASS[type(layer)]
    layer.weight = weight


def residual_bytes(layer: nn.Module) -> int:
    """What one member's residual holds (codes and scales), beyond the shared base."""
    return sum(t.numel() * t.element_size() for t in (layer.delta, layer.delta_scale))


def saving_per_member(shape: tuple[int, ...], element_size: int) -> int:
    """Bytes one member saves holding a weight of `shape` as a residual on a shared base: its
    dense weight out, the int8 codes and one scale per output channel (of the weight's dtype) in."""
    codes = math.prod(shape) * torch.empty((), dtype=DELTA_DTYPE).element_size()
    return math.prod(shape) * element_size - codes - shape[0] * element_size


def dense_bytes(module: nn.Module) -> int:
    """Bytes `module` alone would hold with every residual layer dense again (its unmerged size):
    a residual layer counts as its weight, not as base + codes + scales."""
    storages: dict[tuple[str, int], int] = {}
    for layer in module.modules():
        own = [t for t in (*layer.parameters(recurse=False), *layer.buffers(recurse=False)) if t is not None]
        if is_residual(layer):
            own = [t for t in own if t is not layer.base and t is not layer.delta and t is not layer.delta_scale]
            storages[("dense weight", id(layer))] = layer.base.numel() * layer.base.element_size()
        for t in own:
            storages[("storage", t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()
    return sum(storages.values())


def residual_layers(modules: Mapping[str, nn.Module]) -> Iterable[tuple[LayerRef, nn.Module]]:
    for key, module in modules.items():
        for path, layer in module.named_modules():
            if is_residual(layer):
                yield LayerRef(key, path), layer
