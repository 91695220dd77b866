"""Physically sharing layers: every member of a group holds the anchor's nn.Parameter objects.

The anchor is the group's first member (workload model order). `init="anchor"` (Gemel's way)
keeps the anchor's weights, so the others adopt them and are retrained to fit; `init="mean"`
starts the shared tensor at the members' mean, which for copies fine-tuned from one base is
closer to every member than any one of them is, so less retraining is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from .analysis import LayerRef, SharingGroup


def layer_of(modules: Mapping[str, nn.Module], ref: LayerRef) -> nn.Module:
    return modules[ref.model].get_submodule(ref.path)


def share_group(modules: Mapping[str, nn.Module], group: SharingGroup, init: str = "anchor") -> None:
    anchor = layer_of(modules, group.members[0])
    if init == "mean":
        with torch.no_grad():
            for spec in group.signature.params:
                values = [getattr(layer_of(modules, ref), spec.name) for ref in group.members]
                if all(torch.equal(values[0], v) for v in values[1:]):
                    continue           # the mean of equal tensors is rounded, not always equal to them
                getattr(anchor, spec.name).copy_(torch.stack([v.detach() for v in values]).mean(0))
    elif init != "anchor":
        raise ValueError(f"unknown shared-layer initialisation {init!r} (anchor | mean)")
    for ref in group.members[1:]:
        layer = layer_of(modules, ref)
        for spec in group.signature.params:
            setattr(layer, spec.name, getattr(anchor, spec.name))


def is_shared(modules: Mapping[str, nn.Module], group: SharingGroup) -> bool:
    anchor = layer_of(modules, group.members[0])
    return all(getattr(layer_of(modules, ref), s.name) is getattr(anchor, s.name)
               for ref in group.members[1:] for s in group.signature.params)


def sharing_closure(groups: Iterable[SharingGroup], seeds: Iterable[str]) -> set[str]:
    """The models connected to `seeds` through shared layers: retraining a shared tensor
    changes every model that holds it."""
    groups = list(groups)
    found = set(seeds)
    changed = True
    while changed:
        changed = False
        for g in groups:
            models = set(g.models)
            if models & found and not models <= found:
                found |= models
                changed = True
    return found


@dataclass
class Snapshot:
    """Parameter values of some models, to undo a failed trial (sharing and retraining)."""

    values: dict[str, dict[str, torch.Tensor]]
    requires_grad: dict[str, dict[str, bool]]

    @classmethod
    def take(cls, modules: Mapping[str, nn.Module], models: Iterable[str]) -> "Snapshot":
        values: dict[str, dict[str, torch.Tensor]] = {}
        grads: dict[str, dict[str, bool]] = {}
        for key in models:
            named = list(modules[key].named_parameters(remove_duplicate=False))
            values[key] = {n: p.detach().clone() for n, p in named}
            grads[key] = {n: p.requires_grad for n, p in named}
        return cls(values, grads)

    def restore(self, modules: Mapping[str, nn.Module], unshare: Iterable[SharingGroup]) -> None:
        """Give non-anchor members of `unshare` private parameters again, then put back every value."""
        for group in unshare:
            for ref in group.members[1:]:
                if ref.model not in self.values:
                    continue
                layer = layer_of(modules, ref)
                for spec in group.signature.params:
                    full = f"{ref.path}.{spec.name}" if ref.path else spec.name
                    setattr(layer, spec.name, nn.Parameter(self.values[ref.model][full].clone(),
                                                           requires_grad=self.requires_grad[ref.model][full]))
        with torch.no_grad():
            for key, values in self.values.items():
                for name, param in modules[key].named_parameters(remove_duplicate=False):
                    param.copy_(values[name])
                    param.requires_grad_(self.requires_grad[key][name])
