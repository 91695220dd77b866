"""Hierarchy file loader: YAML -> Hierarchy, every error naming its key path."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional

import yaml

from edgeva.config import ConfigError

from .model import MB, Hierarchy, Link, ModelProfile, Node, Query, SplitPoint

WEIGHT_TOLERANCE_MB = 0.5   # head + tail weights may drift this much across split points


def load_hierarchy(path: str | os.PathLike[str]) -> Hierarchy:
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as exc:
        raise ConfigError("", f"not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError("", f"cannot read {path}: {exc}") from exc
    return parse_hierarchy(raw)


def parse_hierarchy(raw: Any) -> Hierarchy:
    top = _mapping(raw, "")
    _known(top, "", {"reference", "nodes", "links", "models", "queries"})
    nodes: dict[str, Node] = {}
    for i, item in enumerate(_list(top, "nodes", "")):
        node = _node(item, f"nodes[{i}]")
        if node.id in nodes:
            raise ConfigError(f"nodes[{i}].id", f"duplicate node id {node.id!r}")
        nodes[node.id] = node
    if not nodes:
        raise ConfigError("nodes", "at least one node is required")
    links: dict[str, Link] = {}
    for i, item in enumerate(_list(top, "links", "", required=False)):
        p = f"links[{i}]"
        link = _link(item, p)
        for end in ("child", "parent"):
            if getattr(link, end) not in nodes:
                raise ConfigError(f"{p}.{end}", f"unknown node {getattr(link, end)!r}")
        if link.child == link.parent:
            raise ConfigError(f"{p}.parent", "a node cannot be its own parent")
        if link.child in links:
            raise ConfigError(f"{p}.child", f"node {link.child!r} already has an uplink; the hierarchy must be a tree")
        links[link.child] = link
    _check_tree(nodes, links)
    models: dict[str, ModelProfile] = {}
    for i, item in enumerate(_list(top, "models", "")):
        model = _model(item, f"models[{i}]")
        if model.name in models:
            raise ConfigError(f"models[{i}].name", f"duplicate model {model.name!r}")
        models[model.name] = model
    _check_weight_groups(list(models.values()))
    for i, item in enumerate(_list(top, "nodes", "")):
        for m in nodes[item["id"]].model_latency_ms:
            if m not in models:
                raise ConfigError(f"nodes[{i}].model_latency_ms.{m}", f"unknown model {m!r}")
    queries: list[Query] = []
    seen: set[str] = set()
    for i, item in enumerate(_list(top, "queries", "", required=False)):
        p = f"queries[{i}]"
        q = _query(item, p)
        if q.id in seen:
            raise ConfigError(f"{p}.id", f"duplicate query id {q.id!r}")
        if q.source not in nodes:
            raise ConfigError(f"{p}.source", f"unknown node {q.source!r}")
        if q.model not in models:
            raise ConfigError(f"{p}.model", f"unknown model {q.model!r}; known: {sorted(models)}")
        seen.add(q.id)
        queries.append(q)
    reference = top.get("reference", "")
    if not isinstance(reference, str):
        raise ConfigError("reference", "must be a string")
    return Hierarchy(nodes, links, models, queries, reference)


# ----------------------------------------------------------------------- sections

def _node(raw: Any, p: str) -> Node:
    d = _mapping(raw, p)
    _known(d, p, {"id", "tier", "memory_mb", "speed", "max_util", "model_latency_ms"})
    latencies = d.get("model_latency_ms", {}) or {}
    if not isinstance(latencies, dict):
        raise ConfigError(f"{p}.model_latency_ms", "must be a mapping model -> ms")
    for m, v in latencies.items():
        _positive_number(v, f"{p}.model_latency_ms.{m}")
    max_util = _number(d, "max_util", p, default=0.8)
    if not 0 < max_util <= 1:
        raise ConfigError(f"{p}.max_util", "must be within (0, 1]")
    return Node(
        id=_string(d, "id", p),
        memory_bytes=int(_number(d, "memory_mb", p, minimum=0) * MB),
        speed=_number(d, "speed", p, default=1.0, positive=True),
        max_util=max_util,
        tier=_string(d, "tier", p, default=""),
        model_latency_ms={str(k): float(v) for k, v in latencies.items()},
    )


def _link(raw: Any, p: str) -> Link:
    d = _mapping(raw, p)
    _known(d, p, {"child", "parent", "bandwidth_mbps", "rtt_ms", "max_util"})
    max_util = _number(d, "max_util", p, default=1.0)
    if not 0 < max_util <= 1:
        raise ConfigError(f"{p}.max_util", "must be within (0, 1]")
    return Link(_string(d, "child", p), _string(d, "parent", p),
                _number(d, "bandwidth_mbps", p, positive=True), _number(d, "rtt_ms", p, minimum=0), max_util)


def _model(raw: Any, p: str) -> ModelProfile:
    d = _mapping(raw, p)
    _known(d, p, {"name", "weight_group", "source", "split_points"})
    points: list[SplitPoint] = []
    for i, item in enumerate(_list(d, "split_points", p)):
        sp = f"{p}.split_points[{i}]"
        s = _mapping(item, sp)
        _known(s, sp, {"name", "head_ms", "tail_ms", "activation_bytes", "head_weight_mb", "tail_weight_mb"})
        points.append(SplitPoint(
            name=_string(s, "name", sp),
            head_ms=_number(s, "head_ms", sp, minimum=0),
            tail_ms=_number(s, "tail_ms", sp, minimum=0),
            activation_bytes=int(_number(s, "activation_bytes", sp, minimum=0, default=0 if i == 0 else None)),
            head_weight_bytes=int(_number(s, "head_weight_mb", sp, minimum=0) * MB),
            tail_weight_bytes=int(_number(s, "tail_weight_mb", sp, minimum=0) * MB),
        ))
    if len(points) < 2:
        raise ConfigError(f"{p}.split_points", "needs at least the input (0) and the output (K) split points")
    sps = f"{p}.split_points"
    if points[0].head_ms != 0 or points[0].head_weight_bytes != 0:
        raise ConfigError(f"{sps}[0]", "the first split point is the raw input: head_ms and head_weight_mb must be 0")
    if points[-1].tail_ms != 0 or points[-1].tail_weight_bytes != 0:
        raise ConfigError(f"{sps}[{len(points) - 1}]",
                          "the last split point runs the whole model: tail_ms and tail_weight_mb must be 0")
    total = points[0].tail_weight_bytes
    for i, pt in enumerate(points):
        if i and pt.head_weight_bytes < points[i - 1].head_weight_bytes:
            raise ConfigError(f"{sps}[{i}].head_weight_mb", "must not decrease along the split points")
        if abs(pt.head_weight_bytes + pt.tail_weight_bytes - total) > WEIGHT_TOLERANCE_MB * MB:
            raise ConfigError(f"{sps}[{i}]", f"head_weight_mb + tail_weight_mb must equal the model's "
                                             f"{total / MB:g} MB at every split point")
    group = d.get("weight_group")
    if group is not None and not isinstance(group, str):
        raise ConfigError(f"{p}.weight_group", "must be a string")
    return ModelProfile(_string(d, "name", p), points, group, _string(d, "source", p, default=""))


def _query(raw: Any, p: str) -> Query:
    d = _mapping(raw, p)
    _known(d, p, {"id", "source", "model", "fps", "frame_bytes"})
    return Query(_string(d, "id", p), _string(d, "source", p), _string(d, "model", p),
                 _number(d, "fps", p, positive=True), int(_number(d, "frame_bytes", p, positive=True)))


# ----------------------------------------------------------------------- checks

def _check_tree(nodes: dict[str, Node], links: dict[str, Link]) -> None:
    roots = [n for n in nodes if n not in links]
    if len(roots) != 1:
        raise ConfigError("links", f"the hierarchy must have exactly one root (a node without uplink), got {roots}")
    for start in nodes:
        seen = {start}
        node = start
        while node in links:
            node = links[node].parent
            if node in seen:
                raise ConfigError("links", f"cycle through node {node!r}")
            seen.add(node)


def _check_weight_groups(models: list[ModelProfile]) -> None:
    by_group: dict[str, ModelProfile] = {}
    for i, m in enumerate(models):
        if m.weight_group is None:
            continue
        first = by_group.setdefault(m.weight_group, m)
        same = (first.last_split == m.last_split and all(
            first.segment_weight_bytes(s) == m.segment_weight_bytes(s) for s in range(m.last_split)))
        if not same:
            raise ConfigError(f"models[{i}].weight_group",
                              f"shares group {m.weight_group!r} with {first.name!r} but the weight segments differ")


# ----------------------------------------------------------------------- primitives

def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _mapping(raw: Any, path: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(path, f"expected a mapping, got {type(raw).__name__}")
    return raw


def _known(d: dict[str, Any], path: str, keys: set[str]) -> None:
    for k in d:
        if k not in keys:
            raise ConfigError(_join(path, str(k)), f"unknown key; expected one of {sorted(keys)}")


def _list(d: dict[str, Any], key: str, path: str, required: bool = True) -> list[Any]:
    if key not in d or d[key] is None:
        if required:
            raise ConfigError(_join(path, key), "is required")
        return []
    if not isinstance(d[key], list):
        raise ConfigError(_join(path, key), f"expected a list, got {type(d[key]).__name__}")
    return d[key]


def _string(d: dict[str, Any], key: str, path: str, default: Optional[str] = None) -> str:
    if key not in d:
        if default is None:
            raise ConfigError(_join(path, key), "is required")
        return default
    if not isinstance(d[key], str) or not d[key]:
        raise ConfigError(_join(path, key), "must be a non-empty string")
    return d[key]


def _number(d: dict[str, Any], key: str, path: str, default: Optional[float] = None,
            positive: bool = False, minimum: Optional[float] = None) -> float:
    if key not in d:
        if default is None:
            raise ConfigError(_join(path, key), "is required")
        return float(default)
    value = d[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(_join(path, key), f"must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ConfigError(_join(path, key), "must be > 0")
    if minimum is not None and value < minimum:
        raise ConfigError(_join(path, key), f"must be >= {minimum:g}")
    return float(value)


def _positive_number(value: Any, path: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(path, f"must be a number > 0, got {value!r}")
