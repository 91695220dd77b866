"""Groups of identical layers across the models of a workload, and the bytes each would save.

Occurrences are paired the way Gemel pairs them: the k-th layer with a given signature in one
model pairs with the k-th layer with that signature in every other model (in `named_modules`
order), never with another layer of the same model. A group holds one layer per model, so
sharing it saves (members - 1) x layer bytes.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from .signatures import LayerSignature, layer_signature


@dataclass(frozen=True)
class LayerRef:
    model: str      # model key (daemon: "<architecture>@<weights or init>")
    path: str       # dotted module path inside that model


@dataclass(frozen=True)
class SharingGroup:
    signature: LayerSignature
    occurrence: int                     # k: the k-th layer with this signature in each member model
    members: tuple[LayerRef, ...]       # one per model, in workload model order

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(m.model for m in self.members)

    @property
    def bytes_saved(self) -> int:
        return (len(self.members) - 1) * self.signature.param_bytes

    @property
    def group_id(self) -> str:
        """Stable across runs for the same workload (used by checkpoints)."""
        text = repr((self.signature, self.occurrence, self.members))
        return hashlib.sha1(text.encode()).hexdigest()[:12]

    @property
    def layer_id(self) -> str:
        """The same for the group and every restriction of it to fewer models (checkpoints name
        a backed-off group by it and its models)."""
        return hashlib.sha1(repr((self.signature, self.occurrence)).encode()).hexdigest()[:12]

    def restricted_to(self, models: tuple[str, ...]) -> "SharingGroup":
        return SharingGroup(self.signature, self.occurrence, tuple(m for m in self.members if m.model in models))


@dataclass
class ModelSummary:
    key: str
    architecture: str
    param_bytes: int
    shareable_layers: int


@dataclass
class Analysis:
    models: dict[str, ModelSummary]
    groups: list[SharingGroup]                  # shareable, largest saving first
    private_groups: list[SharingGroup] = field(default_factory=list)  # identical but kept private (norm layers)

    @property
    def total_bytes_saved(self) -> int:
        return sum(g.bytes_saved for g in self.groups)

    @property
    def total_param_bytes(self) -> int:
        return sum(m.param_bytes for m in self.models.values())

    def architecture_of(self, model_key: str) -> str:
        return self.models[model_key].architecture

    def is_cross_family(self, group: SharingGroup) -> bool:
        return len({self.architecture_of(m) for m in group.models}) > 1

    def by_id(self) -> dict[str, SharingGroup]:
        return {g.group_id: g for g in self.groups}

    def by_layer_id(self) -> dict[str, SharingGroup]:
        return {g.layer_id: g for g in self.groups}

    def to_json(self) -> dict[str, Any]:
        return {
            "models": {k: vars(m) for k, m in self.models.items()},
            "total_param_bytes": self.total_param_bytes,
            "total_bytes_saved": self.total_bytes_saved,
            "saved_fraction": self.total_bytes_saved / max(1, self.total_param_bytes),
            "groups": [_group_json(self, g) for g in self.groups],
            "private_groups": [dict(_group_json(self, g), kept_private="normalisation layer: per-model statistics")
                               for g in self.private_groups],
        }


def _group_json(analysis: Analysis, g: SharingGroup) -> dict[str, Any]:
    return {"id": g.group_id, "layer": g.signature.describe(), "layer_bytes": g.signature.param_bytes,
            "members": [[m.model, m.path] for m in g.members], "bytes_saved": g.bytes_saved,
            "cross_family": analysis.is_cross_family(g)}


def analyse_modules(modules: Mapping[str, nn.Module], architectures: Mapping[str, str] | None = None) -> Analysis:
    """Find every group of identical layers across `modules` (model key -> module)."""
    architectures = dict(architectures or {})
    occurrences: dict[LayerSignature, dict[str, list[str]]] = {}
    summaries: dict[str, ModelSummary] = {}
    for key, module in modules.items():
        shareable = 0
        for path, layer in module.named_modules():
            sig = layer_signature(layer)
            if sig is None:
                continue
            shareable += sig.shareable
            occurrences.setdefault(sig, {}).setdefault(key, []).append(path)
        param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
        summaries[key] = ModelSummary(key, architectures.get(key, type(module).__name__), param_bytes, shareable)

    model_order = list(modules)
    shared: list[SharingGroup] = []
    private: list[SharingGroup] = []
    for sig, per_model in occurrences.items():
        depth = max(len(paths) for paths in per_model.values())
        for k in range(depth):
            members = tuple(LayerRef(m, per_model[m][k]) for m in model_order
                            if m in per_model and len(per_model[m]) > k)
            if len(members) < 2:
                continue
            (shared if sig.shareable else private).append(SharingGroup(sig, k, members))
    order = {k: i for i, k in enumerate(model_order)}
    sort_key = lambda g: (-g.bytes_saved, order[g.members[0].model], g.members[0].path)  # noqa: E731
    return Analysis(summaries, sorted(shared, key=sort_key), sorted(private, key=sort_key))


def format_analysis(analysis: Analysis, limit: int | None = 40) -> str:
    lines = ["models:"]
    for m in analysis.models.values():
        lines.append(f"  {m.key:<48} {m.architecture:<22} {_mib(m.param_bytes):>10}  {m.shareable_layers} layers")
    lines.append("")
    lines.append(f"{'#':>4} {'layer':<44} {'n':>2} {'saves':>10}  x-family  members")
    shown = analysis.groups if limit is None else analysis.groups[:limit]
    for i, g in enumerate(shown):
        members = ", ".join(f"{m.model.split('@')[0]}:{m.path}" for m in g.members)
        lines.append(f"{i:>4} {g.signature.describe():<44} {len(g.members):>2} {_mib(g.bytes_saved):>10}  "
                     f"{'yes' if analysis.is_cross_family(g) else '   '}       {members}")
    if limit is not None and len(analysis.groups) > limit:
        rest = analysis.groups[limit:]
        lines.append(f"   … {len(rest)} more groups saving {_mib(sum(g.bytes_saved for g in rest))}")
    cross = [g for g in analysis.groups if analysis.is_cross_family(g)]
    lines.append("")
    lines.append(f"total: {len(analysis.groups)} groups, saves {_mib(analysis.total_bytes_saved)} of "
                 f"{_mib(analysis.total_param_bytes)} ({100 * analysis.total_bytes_saved / max(1, analysis.total_param_bytes):.1f}%); "
                 f"{len(cross)} cross-family groups save {_mib(sum(g.bytes_saved for g in cross))}")
    if analysis.private_groups:
        lines.append(f"kept private: {len(analysis.private_groups)} identical normalisation groups "
                     f"({_mib(sum(g.bytes_saved for g in analysis.private_groups))}): per-model running statistics")
    return "\n".join(lines)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"
