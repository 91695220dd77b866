"""Exhaustive search over every combination of options: the ground truth for tests.

Depth-first over queries; a branch is cut only when a capacity is already exceeded
(every resource use only grows as queries are added), so the search stays exact.
"""
from __future__ import annotations

from typing import Optional

from .evaluate import FEASIBILITY_TOL
from .model import Hierarchy
from .options import Choice, Option, SegmentKey, options_for, segment_weight


def solve_brute_force(h: Hierarchy) -> Optional[tuple[list[Choice], float]]:
    """(choices, objective) of an optimal feasible plan, or None when none exists."""
    options = [options_for(h, q) for q in h.queries]
    total_fps = h.total_fps()
    compute = {n: 0.0 for n in h.nodes}
    links = {c: 0.0 for c in h.links}
    memory = {n: 0.0 for n in h.nodes}
    resident: dict[SegmentKey, int] = {}
    weights: dict[SegmentKey, int] = {}
    best: list = [None, float("inf")]
    picked: list[Option] = []

    def fits() -> bool:
        tol = 1 + FEASIBILITY_TOL
        return (all(compute[n] <= h.nodes[n].max_util * tol + FEASIBILITY_TOL for n in compute)
                and all(links[c] <= h.links[c].capacity_bits_per_s * tol for c in links)
                and all(memory[n] <= h.nodes[n].memory_bytes * tol for n in memory))

    def apply(o: Option, sign: int) -> None:
        for n, u in o.compute_util.items():
            compute[n] += sign * u
        for c, b in o.link_bits_per_s.items():
            links[c] += sign * b
        for s in o.segments:
            if s not in weights:
                weights[s] = segment_weight(h, s)
            before = resident.get(s, 0)
            resident[s] = before + sign
            if (before == 0 and sign > 0) or (before == 1 and sign < 0):
                memory[s[0]] += sign * weights[s]

    def visit(q: int, cost: float) -> None:
        if q == len(options):
            if cost < best[1]:
                best[0], best[1] = [o.choice for o in picked], cost
            return
        fps = h.queries[q].fps
        for o in options[q]:
            apply(o, +1)
            if fits():
                picked.append(o)
                visit(q + 1, cost + fps * o.latency_ms)
                picked.pop()
            apply(o, -1)

    visit(0, 0.0)
    if best[0] is None:
        return None
    return best[0], best[1] / total_fps
