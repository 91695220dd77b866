"""The planning instance: a tree of nodes joined by uplinks, model profiles, queries.

Units, used everywhere in the planner:
  * latency in milliseconds, on the *reference node* in profiles;
  * sizes (frames, activations, weights, memory) in bytes, MB = 1e6 bytes in files;
  * bandwidth in Mbit/s (1e6 bit/s), rates in frames per second.

A split point ``k`` of a model cuts it into a *head* (layers before the cut) and a
*tail*. Split index 0 sends the raw frame (empty head); the last index K runs the
whole model in the head (empty tail). Between two consecutive split points lies a
*segment* of weights; a part of the model needs the segments it spans resident on
its node, and a segment is counted once per node however many queries use it
(model-level weight sharing; models in the same ``weight_group`` share too).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

MB = 1_000_000


@dataclass(frozen=True)
class SplitPoint:
    name: str                 # layer name after which the model is cut ("input" for 0)
    head_ms: float            # reference latency of layers before the cut
    tail_ms: float            # reference latency of layers after the cut
    activation_bytes: int     # bytes sent across the cut (ignored at index 0: the frame)
    head_weight_bytes: int
    tail_weight_bytes: int


@dataclass
class ModelProfile:
    name: str
    split_points: list[SplitPoint]
    weight_group: Optional[str] = None   # models sharing a group share resident weights
    source: str = ""                     # where the numbers come from

    @property
    def last_split(self) -> int:
        return len(self.split_points) - 1

    @property
    def total_ms(self) -> float:
        return self.split_points[-1].head_ms

    @property
    def residency_key(self) -> str:
        return self.weight_group or self.name

    def segment_weight_bytes(self, segment: int) -> int:
        """Weights between split points ``segment`` and ``segment + 1``."""
        sp = self.split_points
        return max(0, sp[segment + 1].head_weight_bytes - sp[segment].head_weight_bytes)

    def head_segments(self, split: int) -> range:
        return range(0, split)

    def tail_segments(self, split: int) -> range:
        return range(split, self.last_split)


@dataclass
class Node:
    id: str
    memory_bytes: int
    speed: float = 1.0                     # throughput relative to the reference node
    max_util: float = 0.8                  # compute utilisation cap (queueing headroom)
    tier: str = ""
    model_latency_ms: dict[str, float] = field(default_factory=dict)  # measured full-model latency

    def speed_for(self, model: ModelProfile) -> float:
        measured = self.model_latency_ms.get(model.name)
        if measured is not None and model.total_ms > 0:
            return model.total_ms / measured
        return self.speed


@dataclass
class Link:
    """The uplink of ``child`` to its parent in the tree."""
    child: str
    parent: str
    bandwidth_mbps: float
    rtt_ms: float
    max_util: float = 1.0

    @property
    def id(self) -> str:
        return f"{self.child}->{self.parent}"

    @property
    def capacity_bits_per_s(self) -> float:
        return self.bandwidth_mbps * 1e6 * self.max_util


@dataclass
class Query:
    id: str
    source: str          # node where the camera's frames appear
    model: str
    fps: float
    frame_bytes: int     # encoded input frame (JPEG) size


@dataclass
class Hierarchy:
    nodes: dict[str, Node]
    links: dict[str, Link]            # keyed by child node id
    models: dict[str, ModelProfile]
    queries: list[Query]
    reference: str = ""               # what the profiles' reference node is

    def parent(self, node: str) -> Optional[str]:
        link = self.links.get(node)
        return link.parent if link else None

    def path_up(self, node: str) -> list[str]:
        """``node`` and its ancestors, nearest first, ending at the root."""
        path = [node]
        while (up := self.parent(path[-1])) is not None:
            path.append(up)
        return path

    def links_between(self, lower: str, upper: str) -> list[Link]:
        """Uplinks crossed going from ``lower`` up to its ancestor ``upper``."""
        crossed: list[Link] = []
        node = lower
        while node != upper:
            link = self.links.get(node)
            if link is None:
                raise ValueError(f"{upper!r} is not above {lower!r}")
            crossed.append(link)
            node = link.parent
        return crossed

    def model_of(self, query: Query) -> ModelProfile:
        return self.models[query.model]

    def total_fps(self) -> float:
        return sum(q.fps for q in self.queries)

    def with_queries(self, queries: list[Query]) -> "Hierarchy":
        return Hierarchy(self.nodes, self.links, self.models, queries, self.reference)
