"""Gemel's merge order and back-off, as pure functions over groups.

Order: groups by bytes saved, largest first; consecutive groups with the same layer signature
and the same set of models form one step (Gemel's "group"), at most `max_layers` layers.
Back-off when a step fails its targets:
  1. some models failed and at least two passed: share among the passing models only, and
     queue the failing models (if two or more) as their own candidate;
  2. otherwise, several layers: retry with the first (largest) half, as Gemel halves;
  3. otherwise skip the step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from .analysis import SharingGroup


@dataclass
class Candidate:
    groups: list[SharingGroup]
    origin: str = "plan"        # plan | subset | split | halved

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
        return {"origin": self.origin, "groups": [[g.group_id, list(g.models)] for g in self.groups]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], groups_by_id: Mapping[str, SharingGroup]) -> "Candidate":
        return cls([groups_by_id[gid].restricted_to(tuple(models)) for gid, models in data["groups"]],
                   data["origin"])


def plan_candidates(groups: Iterable[SharingGroup], max_layers: int = 8) -> list[Candidate]:
    steps: list[Candidate] = []
    for g in groups:
        last = steps[-1] if steps else None
        if (last is not None and len(last.groups) < max_layers and last.groups[0].signature == g.signature
                and last.groups[0].models == g.models):
            last.groups.append(g)
        else:
            steps.append(Candidate([g]))
    return steps


def back_off(candidate: Candidate, failing_models: Iterable[str]) -> list[Candidate]:
    failing = set(failing_models) & set(candidate.models)
    passing = tuple(m for m in candidate.models if m not in failing)
    if failing and len(passing) >= 2:
        out = [Candidate([g.restricted_to(passing) for g in candidate.groups], "subset")]
        failed = tuple(m for m in candidate.models if m in failing)
        if len(failed) >= 2:
            out.append(Candidate([g.restricted_to(failed) for g in candidate.groups], "split"))
        return out
    if len(candidate.groups) > 1:
        return [Candidate(candidate.groups[: len(candidate.groups) // 2], "halved")]
    return []
