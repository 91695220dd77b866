"""Gemel's merge order and back-off, as pure functions over groups.

Order: groups by bytes saved, largest first; consecutive groups with the same layer signature
and the same set of models form one step (Gemel's "group"), at most `max_layers` layers.
Back-off when a step fails its targets:
  1. some models failed and at least two passed: share among the passing models only; the
     failing models are left out of that chain;
  2. otherwise, several layers: retry each half (the larger layers first), as Gemel halves;
  3. otherwise skip the step.
When a chain ends (its step accepted, or nothing left to back off to), the models it left out,
with the last step's passing model where only one was left, form a candidate of their own: a
check that stops at the first miss names one failing model per trial, so the models dropped one
by one along a chain are the ones that may still share among themselves. Every such regrouping
leaves out at least the model whose failure ended the chain, so back-off terminates.

After full sharing, the residual pass (`plan_residuals`): every layer location still held
apart becomes one base plus an int8 residual per member (`residual.py`), all in one step that
halves when it fails, and a single failing layer leaves out the failing models' members.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .analysis import LayerRef, SharingGroup
from .residual import saving_per_member


@dataclass
class Candidate:
    """One merge step: `layers` shared among their models, less the ones `left_out`."""

    layers: list[SharingGroup]              # over every model of the step's back-off chain
    origin: str = "plan"                    # plan | subset | split | halved
    left_out: tuple[str, ...] = ()          # models an earlier step of this chain failed on

    @property
    def groups(self) -> list[SharingGroup]:
        if not self.left_out:
            return self.layers
        kept = tuple(m for m in self.layers[0].models if m not in self.left_out)
        return [g.restricted_to(kept) for g in self.layers]

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(m for g in self.groups for m in g.models))

    @property
    def bytes_saved(self) -> int:
        return sum(g.bytes_saved for g in self.groups)

    def describe(self) -> str:
        sig = self.groups[0].signature.describe()
        layers = f" x{len(self.groups)} layers" if len(self.groups) > 1 else ""
        return f"{sig}{layers} over {len(self.models)} models"

    def to_json(self) -> dict[str, Any]:
        return {"origin": self.origin, "groups": [[g.layer_id, list(g.models)] for g in self.layers],
                "left_out": list(self.left_out)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], groups_by_layer: Mapping[str, SharingGroup]) -> "Candidate":
        return cls([groups_by_layer[lid].restricted_to(tuple(models)) for lid, models in data["groups"]],
                   data["origin"], tuple(data.get("left_out", ())))


def plan_candidates(groups: Iterable[SharingGroup], max_layers: int = 8) -> list[Candidate]:
    steps: list[Candidate] = []
    for g in groups:
        last = steps[-1] if steps else None
        if (last is not None and len(last.layers) < max_layers and last.layers[0].signature == g.signature
                and last.layers[0].models == g.models):
            last.layers.append(g)
        else:
            steps.append(Candidate([g]))
    return steps


def back_off(candidate: Candidate, failing_models: Iterable[str]) -> list[Candidate]:
    """The candidates to try, in order, after `candidate` failed on `failing_models`."""
    failing = set(failing_models) & set(candidate.models)
    passing = tuple(m for m in candidate.models if m not in failing)
    failed = tuple(m for m in candidate.models if m in failing)
    if failing and len(passing) >= 2:
        return [Candidate(candidate.layers, "subset", candidate.left_out + failed)]
    groups = candidate.groups
    if len(groups) > 1:
        half = len(groups) // 2
        return [Candidate(groups[:half], "halved"), Candidate(groups[half:], "halved"),
                *_regrouped(candidate, candidate.left_out)]
    return _regrouped(candidate, candidate.left_out + (passing if failing else ()))


def after_acceptance(candidate: Candidate) -> list[Candidate]:
    """The candidate to try after `candidate` was accepted: the models its chain left out."""
    return _regrouped(candidate, candidate.left_out)


def _regrouped(candidate: Candidate, models: tuple[str, ...]) -> list[Candidate]:
    """The chain's layers over `models` alone, as a new chain (nothing when fewer than two)."""
    models = tuple(m for m in candidate.layers[0].models if m in set(models))
    if len(models) < 2:
        return []
    return [Candidate([g.restricted_to(models) for g in candidate.layers], "split")]


# ------------------------------------------------------------------ residual layers
RESIDUAL_KINDS = ("Conv2d", "Linear")


@dataclass(frozen=True)
class ResidualLayer:
    """One layer location held as `base` plus an int8 residual in each of `members`."""

    layer_id: str
    layer: str                          # the signature, described
    base: LayerRef                      # a plain layer (its weight may be a shared group's tensor)
    members: tuple[LayerRef, ...]       # each becomes base + its own residual
    saving_per_member: int

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(m.model for m in self.members)

    @property
    def bytes_saved(self) -> int:
        return len(self.members) * self.saving_per_member

    def restricted_to(self, members: tuple[LayerRef, ...]) -> "ResidualLayer":
        return ResidualLayer(self.layer_id, self.layer, self.base, members, self.saving_per_member)

    def to_json(self) -> dict[str, Any]:
        return {"layer_id": self.layer_id, "layer": self.layer, "base": [self.base.model, self.base.path],
                "members": [[m.model, m.path] for m in self.members], "saving_per_member": self.saving_per_member}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ResidualLayer":
        return cls(data["layer_id"], data["layer"], LayerRef(*data["base"]),
                   tuple(LayerRef(*m) for m in data["members"]), int(data["saving_per_member"]))


def residual_saving(group: SharingGroup) -> int:
    """Bytes one member saves holding the group's weight as an int8 residual on a shared base."""
    weight = next(p for p in group.signature.params if p.name == "weight")
    return saving_per_member(weight.shape, weight.nbytes // max(1, math.prod(weight.shape)))


def plan_residuals(groups: Iterable[SharingGroup], accepted: Iterable[SharingGroup],
                   done: Iterable[str] = ()) -> list[ResidualLayer]:
    """After full sharing, each layer location whose members are not all one tensor: its private
    members become residuals on a base, the largest shared part's tensor where full sharing kept
    one, else the first private member's own weight. Largest saving first."""
    accepted = list(accepted)
    done = set(done)
    plan: list[ResidualLayer] = []
    for g in groups:
        if g.signature.kind not in RESIDUAL_KINDS or g.layer_id in done:
            continue
        if not any(p.name == "weight" for p in g.signature.params):
            continue
        parts = sorted((a for a in accepted if a.layer_id == g.layer_id), key=lambda a: -len(a.members))
        taken = {m for a in parts for m in a.members}
        private = [m for m in g.members if m not in taken]
        base = parts[0].members[0] if parts else (private.pop(0) if private else None)
        if base is None or not private:
            continue
        plan.append(ResidualLayer(g.layer_id, g.signature.describe(), base, tuple(private), residual_saving(g)))
    plan.sort(key=lambda layer: -layer.bytes_saved)
    return plan


def residual_back_off(layers: list[ResidualLayer], failing_models: Iterable[str]) -> list[list[ResidualLayer]]:
    """After a residual step failed: each half of its layers, else the one layer without the
    members of the failing models (nothing when none is left)."""
    if len(layers) > 1:
        half = len(layers) // 2
        return [layers[:half], layers[half:]]
    failing = set(failing_models)
    layer = layers[0]
    kept = tuple(m for m in layer.members if m.model not in failing)
    if not kept or len(kept) == len(layer.members):
        return []
    return [[layer.restricted_to(kept)]]
