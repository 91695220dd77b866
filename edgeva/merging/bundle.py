"""The merged bundle: every model's tensors with each shared group stored once, plus the
merge report. Loading rebuilds each model from its architecture (and its original weights file
for class names and head size, when present), loads the merged tensors and re-shares the groups,
so shared layers are the same nn.Parameter objects in every module that uses them, and
residual layers (`residual.py`) are rebuilt on their base's parameter.

Daemon use: `bundle = load_bundle(path, device)`, then for a model key either take
`bundle.models[key]` (a ready ZooModel) or `apply_bundle(built_zoo_model, bundle.modules[key])`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn

from ..models.base import TorchZooModel, ZooModel
from .analysis import LayerRef, SharingGroup
from . import residual
from .memory import resident_weight_bytes
from .workload import ModelBuilder, default_builder

BUNDLE_FORMAT = "edgeva-merged-bundle"
BUNDLE_VERSION = 3     # 2: each model records the input size it was checked at and its weights' sha256
                       # 3: residual layers (base + int8 residual); a version 2 bundle has none
READABLE_VERSIONS = (2, 3)


class BundleError(RuntimeError):
    pass


@dataclass
class ModelMeta:
    architecture: str
    weights: Optional[str]
    kind: str
    input_size: int                         # the size agreement was checked at; the daemon must run it so
    weights_digest: Optional[str] = None    # sha256 of the original weights file when merged
    queries: list[str] = field(default_factory=list)   # the queries it was merged for


@dataclass
class SharedTensors:
    """One shared group as stored: parameter names, the tensors, and who uses them."""

    params: list[str]
    members: list[LayerRef]
    layer: str = ""


@dataclass
class MergedBundle:
    models: dict[str, ZooModel]
    shared: list[SharedTensors]
    report: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, ModelMeta] = field(default_factory=dict)

    @property
    def modules(self) -> dict[str, nn.Module]:
        return {k: m.module for k, m in self.models.items()}

    def resident_bytes(self) -> int:
        return resident_weight_bytes(self.modules.values())


def save_bundle(path: str | os.PathLike[str], modules: Mapping[str, nn.Module], groups: list[SharingGroup],
                meta: Mapping[str, ModelMeta], report: Optional[dict[str, Any]] = None) -> Path:
    shared_names: dict[str, set[str]] = {k: set() for k in modules}
    shared_records = []
    for g in groups:
        names = [p.name for p in g.signature.params]
        for ref in g.members:
            shared_names[ref.model].update(_full(ref.path, n) for n in names)
        anchor = modules[g.members[0].model].get_submodule(g.members[0].path)
        shared_records.append({"params": names, "members": [[r.model, r.path] for r in g.members],
                               "layer": g.signature.describe(),
                               "tensors": {n: getattr(anchor, n).detach() for n in names}})
    residual_records = _residual_records(modules)
    for rec in residual_records:
        member_model, member_path = rec["member"]
        shared_names[member_model].update(_full(member_path, n) for n in ("base", "delta", "delta_scale"))
    private = {k: {n: t for n, t in m.state_dict().items() if n not in shared_names[k]} for k, m in modules.items()}
    data = {"format": BUNDLE_FORMAT, "version": BUNDLE_VERSION,
            "models": {k: asdict(meta[k]) for k in modules}, "private": private, "shared": shared_records,
            "residual": residual_records, "report": json.dumps(report or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(data, tmp)
    os.replace(tmp, path)
    return path


def read_bundle(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as exc:
        raise BundleError(f"cannot read merged bundle {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not an edgeva merged bundle")
    if data.get("version") not in READABLE_VERSIONS:
        raise BundleError(f"{path}: bundle version {data.get('version')} (this edgeva reads {BUNDLE_VERSION}; "
                          f"version 1 bundles do not record the input size they were checked at: merge again)")
    return data


def install_state(modules: Mapping[str, nn.Module], data: dict[str, Any]) -> list[SharedTensors]:
    """Load a bundle's tensors into already built modules and share its groups among them."""
    missing = [k for k in data["models"] if k not in modules]
    if missing:
        raise BundleError(f"bundle models not built: {', '.join(missing)}")
    states = {k: dict(data["private"][k]) for k in data["models"]}
    records = []
    for rec in data["shared"]:
        members = [LayerRef(k, p) for k, p in rec["members"]]
        for ref in members:
            for name in rec["params"]:
                states[ref.model][_full(ref.path, name)] = rec["tensors"][name]
        records.append(SharedTensors(list(rec["params"]), members, rec.get("layer", "")))
    residuals = data.get("residual", [])
    for rec in residuals:      # loaded as a plain layer holding the base, then made a residual one
        (model, path), (base_model, base_path) = rec["member"], rec["base"]
        base_weight = states.get(base_model, {}).get(_full(base_path, "weight"))
        if model not in states or base_weight is None:
            raise BundleError(f"bundle residual layer {model}:{path} names a base {base_model}:{base_path} it lacks")
        states[model][_full(path, "weight")] = base_weight
    for key, state in states.items():
        try:
            modules[key].load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise BundleError(f"bundle tensors do not fit model {key}: {str(exc).splitlines()[0]}") from None
    for rec in records:
        _share_record(modules, rec)
    for rec in residuals:
        (model, path), (base_model, base_path) = rec["member"], rec["base"]
        base = modules[base_model].get_submodule(base_path).weight
        residual.install(modules[model].get_submodule(path), base, rec["delta"], rec["delta_scale"])
    return records


def load_bundle(path: str | os.PathLike[str], device: str = "cpu",
                builder: ModelBuilder = default_builder) -> MergedBundle:
    data = read_bundle(path)
    models: dict[str, ZooModel] = {}
    metas = {key: ModelMeta(**meta) for key, meta in data["models"].items()}
    for key, meta in metas.items():
        if meta.weights is not None and not Path(meta.weights).exists():
            raise BundleError(f"model {key}: its original weights file {meta.weights} (needed for the architecture "
                              f"and class names) is missing")
        models[key] = builder(meta.architecture, meta.weights, False, "cpu")
        models[key].input_size = meta.input_size
    records = install_state({k: m.module for k, m in models.items()}, data)
    for m in models.values():
        m.to(device)  # Module.to keeps Parameter objects, so sharing survives the move
    return MergedBundle(models, records, json.loads(data.get("report") or "{}"), metas)


def bundle_mismatches(meta: Mapping[str, ModelMeta], queries: Iterable[Any]) -> list[str]:
    """Why a bundle cannot serve these queries (empty: it can). Each of its models must be used by
    a query of the same architecture and weights file, unchanged since the merge, run at the input
    size the merge checked agreement at."""
    from ..models.zoo import default_input_size
    from .workload import file_digest

    problems: list[str] = []
    digests: dict[str, Optional[str]] = {}
    for key, m in meta.items():
        users = [q for q in queries if q.task.type != "passthrough" and q.model == m.architecture
                 and q.weights == m.weights]
        if not users:
            problems.append(f"no query runs its model {m.architecture} with weights {m.weights} "
                            f"(merged for {', '.join(m.queries) or 'another config'})")
            continue
        for q in users:
            size = q.input_size or default_input_size(q.model)
            if size != m.input_size:
                problems.append(f"query {q.id!r} runs {q.model} at {size} px but the bundle was merged and "
                                f"checked at {m.input_size} px (set input_size: {m.input_size} or merge again)")
            if m.weights_digest is not None and q.weights:
                if q.weights not in digests:
                    digests[q.weights] = file_digest(q.weights)
                if digests[q.weights] != m.weights_digest:
                    problems.append(f"query {q.id!r}: weights file {q.weights} changed since the bundle was "
                                    f"merged (the bundle holds weights trained from the old file; merge again)")
    return problems


def apply_bundle(model: ZooModel, module: nn.Module) -> ZooModel:
    """Make a built ZooModel run the bundle's merged module."""
    if not isinstance(model, TorchZooModel):
        raise BundleError(f"{model.name}: not a torch model, a merged module cannot replace its weights")
    model.replace_module(module)
    return model


def _residual_records(modules: Mapping[str, nn.Module]) -> list[dict[str, Any]]:
    """Each residual layer with the plain layer whose weight is its base (the first in model order)."""
    owner: dict[int, LayerRef] = {}
    for key, module in modules.items():
        for path, layer in module.named_modules():
            weight = getattr(layer, "weight", None) if not residual.is_residual(layer) else None
            if isinstance(weight, nn.Parameter):
                owner.setdefault(id(weight), LayerRef(key, path))
    records = []
    for ref, layer in residual.residual_layers(modules):
        base = owner.get(id(layer.base))
        if base is None:
            raise BundleError(f"residual layer {ref.model}:{ref.path} has a base no plain layer holds")
        records.append({"member": [ref.model, ref.path], "base": [base.model, base.path],
                        "delta": layer.delta.detach().cpu(), "delta_scale": layer.delta_scale.detach().cpu()})
    return records


def _share_record(modules: Mapping[str, nn.Module], rec: SharedTensors) -> None:
    anchor = modules[rec.members[0].model].get_submodule(rec.members[0].path)
    for ref in rec.members[1:]:
        layer = modules[ref.model].get_submodule(ref.path)
        for name in rec.params:
            setattr(layer, name, getattr(anchor, name))


def _full(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
