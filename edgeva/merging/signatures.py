"""Layer signatures: two layers with equal signatures compute the same function shape-wise,
so one weight tensor can serve both.

Shareable: Conv1d/2d/3d, ConvTranspose2d and Linear (exact classes; a subclass may change
`forward`). The signature is the class plus every hyperparameter that changes what the layer
computes, plus the name, shape and dtype of each of its own parameters.

Normalisation layers are never shared here. A BatchNorm in eval mode normalises with its own
running statistics, which describe *that* model's activations; sharing them (or the affine
parameters tuned against them) changes every sharing model's output, and distillation trains
with BN in eval mode (statistics frozen), so it could not re-estimate them. Sharing BN would be
safe only when running stats and affine params are shared *and* re-estimated in train mode on
every sharing model's data. BN groups are still reported ("kept private") with the bytes they
hold, which are tiny next to the convolutions they follow.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

SHAREABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.Linear)
NORM_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm, nn.LayerNorm)

_CONV_FIELDS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode", "transposed", "output_padding")
_LINEAR_FIELDS = ("in_features", "out_features")
_NORM_FIELDS = ("num_features", "eps", "momentum", "affine", "track_running_stats",
                "num_groups", "num_channels", "normalized_shape", "elementwise_affine")


@dataclass(frozen=True)
class ParamSpec:
    name: str                 # attribute on the layer: weight, bias
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass(frozen=True)
class LayerSignature:
    kind: str                                  # class name: Conv2d, Linear, BatchNorm2d
    hyper: tuple[tuple[str, Any], ...]         # (field, value) pairs, including bias presence
    params: tuple[ParamSpec, ...]
    shareable: bool                            # False: reported, never merged (normalisation)

    @property
    def param_bytes(self) -> int:
        return sum(p.nbytes for p in self.params)

    def describe(self) -> str:
        h = dict(self.hyper)
        if self.kind.startswith(("Conv", "ConvTranspose")):
            k = "x".join(map(str, h["kernel_size"]))
            extra = "".join(f", {name[0]}{_flat(h[name])}" for name in ("stride", "padding", "dilation")
                            if any(v != (1 if name != "padding" else 0) for v in h[name]))
            groups = f", groups={h['groups']}" if h["groups"] != 1 else ""
            return f"{self.kind}({h['in_channels']}->{h['out_channels']}, {k}{extra}{groups}, bias={h['bias']})"
        if self.kind == "Linear":
            return f"Linear({h['in_features']}->{h['out_features']}, bias={h['bias']})"
        shapes = ", ".join(f"{p.name}{list(p.shape)}" for p in self.params)
        return f"{self.kind}({shapes})"


def layer_signature(module: nn.Module) -> Optional[LayerSignature]:
    """The signature of a leaf layer that holds parameters, or None for anything else."""
    own = [(n, p) for n, p in module.named_parameters(recurse=False) if p is not None]
    if not own:
        return None
    cls = type(module)
    if cls in SHAREABLE_TYPES:
        fields = _CONV_FIELDS if cls is not nn.Linear else _LINEAR_FIELDS
        shareable = True
    elif cls in NORM_TYPES:
        fields = _NORM_FIELDS
        shareable = False
    else:
        return None
    hyper = tuple((f, _freeze(getattr(module, f))) for f in fields if hasattr(module, f))
    hyper += (("bias", getattr(module, "bias", None) is not None),)
    params = tuple(ParamSpec(n, tuple(p.shape), str(p.dtype).removeprefix("torch.")) for n, p in own)
    return LayerSignature(cls.__name__, hyper, params, shareable)


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, torch.Size):
        return tuple(value)
    return value


def _flat(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))
