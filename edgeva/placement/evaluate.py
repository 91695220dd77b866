"""Score a full assignment from scratch: the referee for every solver.

Deliberately does not reuse ``Option`` objects: it walks the tree itself, so a
bookkeeping bug in the MILP or heuristic shows up as a disagreement in tests.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .model import Hierarchy
from .options import Choice, LatencyBreakdown, crossing_bytes, latency_of

FEASIBILITY_TOL = 1e-9


@dataclass(frozen=True)
class Violation:
    kind: str          # "memory" | "compute" | "link"
    resource: str      # node id or link id
    used: float
    capacity: float
    unit: str

    def describe(self) -> str:
        label = {"memory": "memory of node", "compute": "compute of node", "link": "bandwidth of link"}[self.kind]
        return (f"{label} {self.resource}: needs {self.used:.4g} {self.unit}, "
                f"has {self.capacity:.4g} {self.unit}")


@dataclass
class Evaluation:
    objective_ms: float                       # rate-weighted mean end-to-end latency
    latency: list[LatencyBreakdown]
    compute_util: dict[str, float]
    memory_bytes: dict[str, int]
    resident: dict[str, list[tuple[str, int]]]   # node -> [(residency key, segment)]
    link_bits_per_s: dict[str, float]
    violations: list[Violation] = field(default_factory=list)

    @property
    def feasible(self) -> bool:
        return not self.violations


def check_choice(h: Hierarchy, qi: int, choice: Choice) -> None:
    q = h.queries[qi]
    path = h.path_up(q.source)
    if choice.head not in path:
        raise ValueError(f"query {q.id}: head node {choice.head} is not on the path {path}")
    if choice.tail not in path[path.index(choice.head):]:
        raise ValueError(f"query {q.id}: tail node {choice.tail} is not at or above {choice.head}")
    if not 0 <= choice.split <= h.model_of(q).last_split:
        raise ValueError(f"query {q.id}: split {choice.split} out of range")


def evaluate(h: Hierarchy, choices: Sequence[Choice]) -> Evaluation:
    if len(choices) != len(h.queries):
        raise ValueError("one choice per query is required")
    compute = {n: 0.0 for n in h.nodes}
    links = {c: 0.0 for c in h.links}
    resident: dict[str, set[tuple[str, int]]] = {n: set() for n in h.nodes}
    latencies: list[LatencyBreakdown] = []
    weighted = 0.0
    for qi, (q, c) in enumerate(zip(h.queries, choices)):
        check_choice(h, qi, c)
        model = h.model_of(q)
        sp = model.split_points[c.split]
        compute[c.head] += q.fps * sp.head_ms / 1e3 / h.nodes[c.head].speed_for(model)
        compute[c.tail] += q.fps * sp.tail_ms / 1e3 / h.nodes[c.tail].speed_for(model)
        for link in h.links_between(q.source, c.head):
            links[link.child] += 8.0 * q.fps * q.frame_bytes
        for link in h.links_between(c.head, c.tail):
            links[link.child] += 8.0 * q.fps * crossing_bytes(q, model, c.split)
        for seg in range(model.last_split):
            node = c.head if seg < c.split else c.tail
            if model.segment_weight_bytes(seg) > 0:
                resident[node].add((model.residency_key, seg))
        lat = latency_of(h, q, c)
        latencies.append(lat)
        weighted += q.fps * lat.total_ms
    weights = _segment_weights(h)
    memory = {n: sum(weights[k] for k in segs) for n, segs in resident.items()}
    violations: list[Violation] = []
    for n, node in h.nodes.items():
        if memory[n] > node.memory_bytes * (1 + FEASIBILITY_TOL):
            violations.append(Violation("memory", n, memory[n] / 1e6, node.memory_bytes / 1e6, "MB"))
        if compute[n] > node.max_util * (1 + FEASIBILITY_TOL) + FEASIBILITY_TOL:
            violations.append(Violation("compute", n, compute[n], node.max_util, "utilisation"))
    for child, link in h.links.items():
        if links[child] > link.capacity_bits_per_s * (1 + FEASIBILITY_TOL):
            violations.append(Violation("link", link.id, links[child] / 1e6,
                                        link.capacity_bits_per_s / 1e6, "Mbit/s"))
    total = h.total_fps()
    return Evaluation(
        objective_ms=weighted / total if total else 0.0,
        latency=latencies,
        compute_util=compute,
        memory_bytes=memory,
        resident={n: sorted(s) for n, s in resident.items()},
        link_bits_per_s=links,
        violations=violations,
    )


def _segment_weights(h: Hierarchy) -> dict[tuple[str, int], int]:
    weights: dict[tuple[str, int], int] = {}
    for m in h.models.values():
        for seg in range(m.last_split):
            weights.setdefault((m.residency_key, seg), m.segment_weight_bytes(seg))
    return weights


@dataclass(frozen=True)
class QueueingEstimate:
    """Post-hoc M/G/1 (Pollaczek-Khinchine) waits; the optimiser itself keeps utilisation
    under ``max_util`` instead of pricing queueing, which would make the model non-linear."""
    node_wait_ms: dict[str, float]
    link_wait_ms: dict[str, float]
    objective_with_queueing_ms: float


def queueing_estimate(h: Hierarchy, choices: Sequence[Choice]) -> QueueingEstimate:
    # Each node is one server; each part is a deterministic service time at Poisson arrivals.
    node_jobs: dict[str, list[tuple[float, float]]] = {n: [] for n in h.nodes}   # (rate, service_s)
    link_jobs: dict[str, list[tuple[float, float]]] = {c: [] for c in h.links}
    for q, c in zip(h.queries, choices):
        model = h.model_of(q)
        sp = model.split_points[c.split]
        for node, ms in ((c.head, sp.head_ms), (c.tail, sp.tail_ms)):
            if ms > 0:
                node_jobs[node].append((q.fps, ms / 1e3 / h.nodes[node].speed_for(model)))
        for link in h.links_between(q.source, c.head):
            link_jobs[link.child].append((q.fps, 8.0 * q.frame_bytes / (link.bandwidth_mbps * 1e6)))
        for link in h.links_between(c.head, c.tail):
            sent = crossing_bytes(q, model, c.split)
            link_jobs[link.child].append((q.fps, 8.0 * sent / (link.bandwidth_mbps * 1e6)))
    node_wait = {n: _pk_wait_ms(jobs) for n, jobs in node_jobs.items()}
    link_wait = {c: _pk_wait_ms(jobs) for c, jobs in link_jobs.items()}
    weighted = 0.0
    for q, c in zip(h.queries, choices):
        lat = latency_of(h, q, c).total_ms
        model = h.model_of(q)
        sp = model.split_points[c.split]
        waits = sum(node_wait[n] for n, ms in ((c.head, sp.head_ms), (c.tail, sp.tail_ms)) if ms > 0)
        waits += sum(link_wait[l.child] for l in h.links_between(q.source, c.tail))
        weighted += q.fps * (lat + waits)
    total = h.total_fps()
    return QueueingEstimate(node_wait, link_wait, weighted / total if total else 0.0)


def _pk_wait_ms(jobs: list[tuple[float, float]]) -> float:
    rho = sum(rate * s for rate, s in jobs)
    if not jobs or rho == 0:
        return 0.0
    if rho >= 1:
        return float("inf")
    second_moment_rate = sum(rate * s * s for rate, s in jobs)   # lambda * E[S^2]
    return 1e3 * second_moment_rate / (2 * (1 - rho))
