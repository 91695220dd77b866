"""The plan: who runs what where, what it costs, and a plan file (YAML or JSON)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from .evaluate import evaluate, queueing_estimate
from .model import Hierarchy
from .options import Choice

PLAN_FORMAT = 1


@dataclass
class Assignment:
    query: str
    model: str
    source: str
    head_node: str
    tail_node: str
    split: int
    split_name: str
    last_split: int
    latency_ms: float
    frame_transfer_ms: float
    head_compute_ms: float
    activation_transfer_ms: float
    tail_compute_ms: float
    rtt_ms: float

    @property
    def choice(self) -> Choice:
        return Choice(self.head_node, self.tail_node, self.split)


@dataclass
class NodeUsage:
    compute_util: float
    max_util: float
    memory_mb: float
    memory_capacity_mb: float
    resident: list[str] = field(default_factory=list)   # "model[segment]"
    queue_wait_ms: float = 0.0


@dataclass
class LinkUsage:
    mbps: float
    capacity_mbps: float
    utilisation: float
    queue_wait_ms: float = 0.0


@dataclass
class Plan:
    assignments: list[Assignment]
    objective_ms: float                     # rate-weighted mean latency, no queueing
    objective_with_queueing_ms: float       # post-hoc M/G/1 estimate
    nodes: dict[str, NodeUsage]
    links: dict[str, LinkUsage]
    solver: str
    optimal: bool
    solve_time_s: float
    baselines: dict[str, Optional[float]] = field(default_factory=dict)  # name -> objective, None = infeasible
    notes: list[str] = field(default_factory=list)

    # ----------------------------------------------------------------- building
    @classmethod
    def from_choices(cls, h: Hierarchy, choices: Sequence[Choice], solver: str, optimal: bool,
                     solve_time_s: float, baselines: Optional[dict[str, Optional[float]]] = None,
                     notes: Optional[list[str]] = None) -> "Plan":
        ev = evaluate(h, choices)
        if not ev.feasible:
            raise ValueError("plan violates capacities: " + "; ".join(v.describe() for v in ev.violations))
        qe = queueing_estimate(h, choices)
        assignments = []
        for q, c, lat in zip(h.queries, choices, ev.latency):
            model = h.model_of(q)
            assignments.append(Assignment(
                q.id, q.model, q.source, c.head, c.tail, c.split, model.split_points[c.split].name, model.last_split,
                lat.total_ms, lat.frame_transfer_ms, lat.head_compute_ms,
                lat.activation_transfer_ms, lat.tail_compute_ms, lat.rtt_ms))
        nodes = {
            n: NodeUsage(ev.compute_util[n], node.max_util, ev.memory_bytes[n] / 1e6, node.memory_bytes / 1e6,
                         _compact_segments(ev.resident[n]), qe.node_wait_ms[n])
            for n, node in h.nodes.items()
        }
        links = {
            link.id: LinkUsage(ev.link_bits_per_s[c] / 1e6, link.bandwidth_mbps,
                               ev.link_bits_per_s[c] / (link.bandwidth_mbps * 1e6), qe.link_wait_ms[c])
            for c, link in h.links.items()
        }
        return cls(assignments, ev.objective_ms, qe.objective_with_queueing_ms, nodes, links, solver,
                   optimal, solve_time_s, dict(baselines or {}), list(notes or []))

    @property
    def choices(self) -> list[Choice]:
        return [a.choice for a in self.assignments]

    # ----------------------------------------------------------------- reading
    def explain(self) -> str:
        lines = [
            f"placement plan ({self.solver}{', optimal' if self.optimal else ''}, "
            f"solved in {self.solve_time_s * 1e3:.1f} ms)",
            f"  rate-weighted mean latency: {self.objective_ms:.2f} ms "
            f"(with M/G/1 queueing estimate: {self.objective_with_queueing_ms:.2f} ms)",
        ]
        for name, value in self.baselines.items():
            if value is None:
                lines.append(f"  baseline {name}: infeasible")
            else:
                ratio = value / self.objective_ms if self.objective_ms > 0 else float("inf")
                lines.append(f"  baseline {name}: {value:.2f} ms ({ratio:.2f}x this plan)")
        lines.append("queries:")
        for a in self.assignments:
            if a.split == 0:
                where = f"raw frame {a.source} -> {a.tail_node}, whole model on {a.tail_node}"
            elif a.split == a.last_split:
                where = f"whole model on {a.head_node}" + (
                    "" if a.head_node == a.source else f" (frame {a.source} -> {a.head_node})")
            else:
                where = f"layers up to {a.split_name} on {a.head_node}, rest on {a.tail_node}"
            lines.append(
                f"  {a.query} ({a.model} @ {a.source}): {where}; {a.latency_ms:.2f} ms = "
                f"frame {a.frame_transfer_ms:.2f} + head {a.head_compute_ms:.2f} + "
                f"activation {a.activation_transfer_ms:.2f} + tail {a.tail_compute_ms:.2f} + rtt {a.rtt_ms:.2f}")
        lines.append("nodes:")
        for n, u in self.nodes.items():
            lines.append(
                f"  {n}: compute {u.compute_util:.0%} of {u.max_util:.0%} cap, memory {u.memory_mb:.1f}/"
                f"{u.memory_capacity_mb:.0f} MB, wait ~{u.queue_wait_ms:.2f} ms"
                + (f", weights {', '.join(u.resident)}" if u.resident else ""))
        lines.append("links:")
        for lid, l in self.links.items():
            lines.append(f"  {lid}: {l.mbps:.2f}/{l.capacity_mbps:.0f} Mbit/s ({l.utilisation:.0%}), "
                         f"wait ~{l.queue_wait_ms:.2f} ms")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    # ----------------------------------------------------------------- plan file
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["format"] = PLAN_FORMAT
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(f"unsupported plan format {d.get('format')!r}, expected {PLAN_FORMAT}")
        return cls(
            assignments=[Assignment(**a) for a in d["assignments"]],
            objective_ms=d["objective_ms"],
            objective_with_queueing_ms=d["objective_with_queueing_ms"],
            nodes={k: NodeUsage(**v) for k, v in d["nodes"].items()},
            links={k: LinkUsage(**v) for k, v in d["links"].items()},
            solver=d["solver"], optimal=d["optimal"], solve_time_s=d["solve_time_s"],
            baselines=dict(d.get("baselines", {})), notes=list(d.get("notes", [])),
        )

    def save(self, path: str | Path) -> None:
        path = Path(path)
        data = self.to_dict()
        if path.suffix == ".json":
            path.write_text(json.dumps(data, indent=2))
        else:
            path.write_text(yaml.safe_dump(data, sort_keys=False))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        path = Path(path)
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        return cls.from_dict(data)


def _compact_segments(resident: list[tuple[str, int]]) -> list[str]:
    """[("m", 0), ("m", 1), ("m", 2)] -> ["m[0-2]"] (segments between split points)."""
    by_model: dict[str, list[int]] = {}
    for key, seg in resident:
        by_model.setdefault(key, []).append(seg)
    out = []
    for key, segs in by_model.items():
        segs.sort()
        runs, start = [], segs[0]
        for a, b in zip(segs, segs[1:] + [None]):
            if b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}-{a}")
                start = b
        out.append(f"{key}[{','.join(runs)}]")
    return out
