"""Per-query placement options and what each one costs.

An option is (head node, tail node, split index). Frames go up the tree from the
query's source to the head node, the activation at the split goes on up to the tail
node, and the result comes back down to the source. Options that only differ in
where an *empty* part sits are merged: split 0 puts the empty head on the tail node,
the last split puts the empty tail on the head node. "Whole model on node n" is the
last split when n is the source and split 0 (raw frame sent up) otherwise.

Latency of one frame (no queueing; see ``evaluate.queueing_estimate``):
    sum over links source->head of 8*frame_bytes/bandwidth
  + head_ms / speed(head)
  + sum over links head->tail of 8*activation_bytes/bandwidth
  + tail_ms / speed(tail)
  + sum of RTTs of links source->tail   (one way up for the data, one way down for the result)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .model import Hierarchy, ModelProfile, Query

SegmentKey = tuple[str, str, int]   # (node, residency key, segment index)


@dataclass(frozen=True)
class Choice:
    head: str
    tail: str
    split: int


@dataclass(frozen=True)
class LatencyBreakdown:
    frame_transfer_ms: float
    head_compute_ms: float
    activation_transfer_ms: float
    tail_compute_ms: float
    rtt_ms: float

    @property
    def total_ms(self) -> float:
        return (self.frame_transfer_ms + self.head_compute_ms + self.activation_transfer_ms
                + self.tail_compute_ms + self.rtt_ms)


@dataclass
class Option:
    choice: Choice
    latency: LatencyBreakdown
    compute_util: dict[str, float] = field(default_factory=dict)   # node -> utilisation added
    link_bits_per_s: dict[str, float] = field(default_factory=dict)  # link child -> bit/s added
    segments: frozenset[SegmentKey] = frozenset()

    @property
    def latency_ms(self) -> float:
        return self.latency.total_ms


def transfer_ms(n_bytes: float, bandwidth_mbps: float) -> float:
    return 8.0 * n_bytes / (bandwidth_mbps * 1e6) * 1e3


def crossing_bytes(query: Query, model: ModelProfile, split: int) -> int:
    return query.frame_bytes if split == 0 else model.split_points[split].activation_bytes


def latency_of(h: Hierarchy, query: Query, choice: Choice) -> LatencyBreakdown:
    model = h.model_of(query)
    sp = model.split_points[choice.split]
    sent = crossing_bytes(query, model, choice.split)
    return LatencyBreakdown(
        frame_transfer_ms=sum(transfer_ms(query.frame_bytes, l.bandwidth_mbps)
                              for l in h.links_between(query.source, choice.head)),
        head_compute_ms=sp.head_ms / h.nodes[choice.head].speed_for(model) if sp.head_ms else 0.0,
        activation_transfer_ms=sum(transfer_ms(sent, l.bandwidth_mbps)
                                   for l in h.links_between(choice.head, choice.tail)),
        tail_compute_ms=sp.tail_ms / h.nodes[choice.tail].speed_for(model) if sp.tail_ms else 0.0,
        rtt_ms=sum(l.rtt_ms for l in h.links_between(query.source, choice.tail)),
    )


def canonical_choices(h: Hierarchy, query: Query) -> list[Choice]:
    model = h.model_of(query)
    last = model.last_split
    path = h.path_up(query.source)
    choices: list[Choice] = []
    for i, head in enumerate(path):
        for split in range(last + 1):
            if split == 0:
                if i > 0:   # raw frame up to `head`, whole model there (same plan as split K there)
                    choices.append(Choice(head, head, 0))
            elif split == last:
                if i == 0:  # whole model on the source node itself
                    choices.append(Choice(head, head, last))
            else:
                # tail == head would be the whole model on one node: already listed
                choices.extend(Choice(head, tail, split) for tail in path[i + 1:])
    return choices


def build_option(h: Hierarchy, query: Query, choice: Choice) -> Option:
    model = h.model_of(query)
    sp = model.split_points[choice.split]
    compute: dict[str, float] = {}
    for node, ms in ((choice.head, sp.head_ms), (choice.tail, sp.tail_ms)):
        if ms > 0:
            compute[node] = compute.get(node, 0.0) + query.fps * ms / 1e3 / h.nodes[node].speed_for(model)
    links: dict[str, float] = {}
    for link in h.links_between(query.source, choice.head):
        links[link.child] = links.get(link.child, 0.0) + 8.0 * query.fps * query.frame_bytes
    sent = crossing_bytes(query, model, choice.split)
    for link in h.links_between(choice.head, choice.tail):
        links[link.child] = links.get(link.child, 0.0) + 8.0 * query.fps * sent
    key = model.residency_key
    segments = {(choice.head, key, s) for s in model.head_segments(choice.split)}
    segments |= {(choice.tail, key, s) for s in model.tail_segments(choice.split)}
    segments = {s for s in segments if model.segment_weight_bytes(s[2]) > 0}
    return Option(choice, latency_of(h, query, choice), compute, links, frozenset(segments))


def options_for(h: Hierarchy, query: Query) -> list[Option]:
    return [build_option(h, query, c) for c in canonical_choices(h, query)]


def segment_weight(h: Hierarchy, key: SegmentKey) -> int:
    _, residency, seg = key
    for model in h.models.values():
        if model.residency_key == residency:
            return model.segment_weight_bytes(seg)
    raise KeyError(residency)
