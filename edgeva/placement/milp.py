"""Exact placement as a 0/1 MILP solved by scipy.optimize.milp (HiGHS).

Variables: x[q,o] = 1 when query q uses option o; y[s] = 1 when weight segment
s = (node, model, segment) is resident. Rows (capacities scaled to 1):
  sum_o x[q,o] = 1                                     one option per query
  sum_{o of q needing s} x[q,o] - y[s] <= 0            weights present where used
  sum_s weight_s / M_n * y[s] <= 1                     memory per node (shared weights once)
  sum fps*ms/speed / max_util * x <= 1                 compute per node
  sum 8*fps*bytes / capacity * x <= 1                  bandwidth per link
Objective: sum fps_q * latency(q,o) / sum fps * x[q,o].
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_matrix

from .evaluate import Violation
from .errors import InfeasiblePlanError
from .model import Hierarchy
from .options import Choice, Option, SegmentKey, options_for, segment_weight


@dataclass
class MilpResult:
    choices: Optional[list[Choice]]   # None when the time limit hit before any solution
    optimal: bool
    objective_ms: float
    solve_time_s: float
    n_variables: int
    mip_gap: Optional[float]


class _Rows:
    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lb: list[float] = []
        self.ub: list[float] = []
        self.labels: list[tuple[str, str]] = []

    def add(self, entries: dict[int, float], lb: float, ub: float, label: tuple[str, str] = ("", "")) -> None:
        r = len(self.lb)
        for col, val in entries.items():
            if val != 0.0:
                self.rows.append(r)
                self.cols.append(col)
                self.vals.append(val)
        self.lb.append(lb)
        self.ub.append(ub)
        self.labels.append(label)


@dataclass
class _Model:
    options: list[list[Option]]
    x_index: list[list[int]]
    segments: list[SegmentKey]
    rows: _Rows
    capacity_rows: list[int]
    n_vars: int
    cost: np.ndarray


def _build(h: Hierarchy, options: list[list[Option]]) -> _Model:
    x_index: list[list[int]] = []
    n = 0
    for opts in options:
        x_index.append(list(range(n, n + len(opts))))
        n += len(opts)
    segments = sorted({s for opts in options for o in opts for s in o.segments})
    y_index = {s: n + i for i, s in enumerate(segments)}
    n_vars = n + len(segments)
    total_fps = h.total_fps()
    cost = np.zeros(n_vars)
    rows = _Rows()
    memory: dict[str, dict[int, float]] = {nd: {} for nd in h.nodes}
    compute: dict[str, dict[int, float]] = {nd: {} for nd in h.nodes}
    links: dict[str, dict[int, float]] = {c: {} for c in h.links}
    for q, (opts, idx) in enumerate(zip(options, x_index)):
        fps = h.queries[q].fps
        rows.add({i: 1.0 for i in idx}, 1.0, 1.0)
        users: dict[SegmentKey, dict[int, float]] = {}
        for o, i in zip(opts, idx):
            cost[i] = fps * o.latency_ms / total_fps
            for s in o.segments:
                users.setdefault(s, {})[i] = 1.0
            for nd, util in o.compute_util.items():
                compute[nd][i] = compute[nd].get(i, 0.0) + util / h.nodes[nd].max_util
            for child, bits in o.link_bits_per_s.items():
                links[child][i] = bits / h.links[child].capacity_bits_per_s
        for s, entries in users.items():
            rows.add({**entries, y_index[s]: -1.0}, -np.inf, 0.0)
    for s, col in y_index.items():
        nd = s[0]
        memory[nd][col] = segment_weight(h, s) / max(h.nodes[nd].memory_bytes, 1e-9)
    capacity_rows: list[int] = []
    for kind, table in (("memory", memory), ("compute", compute), ("link", links)):
        for res, entries in table.items():
            if entries:
                capacity_rows.append(len(rows.lb))
                rows.add(entries, -np.inf, 1.0, (kind, res))
    return _Model(options, x_index, segments, rows, capacity_rows, n_vars, cost)


def _matrix(rows: _Rows, n_cols: int):
    return coo_matrix((rows.vals, (rows.rows, rows.cols)), shape=(len(rows.lb), n_cols)).tocsr()


def solve_milp(h: Hierarchy, time_limit_s: float = 60.0, mip_rel_gap: float = 1e-9,
               diagnose: bool = True) -> MilpResult:
    """Optimal choices, or raise ``InfeasiblePlanError`` naming the overloaded resources
    (found by a second, elastic MILP unless ``diagnose`` is False)."""
    t0 = time.perf_counter()
    options = [options_for(h, q) for q in h.queries]
    m = _build(h, options)
    res = milp(
        c=m.cost,
        integrality=np.ones(m.n_vars),
        bounds=Bounds(0, 1),
        constraints=LinearConstraint(_matrix(m.rows, m.n_vars), m.rows.lb, m.rows.ub),
        options={"time_limit": time_limit_s, "mip_rel_gap": mip_rel_gap},
    )
    elapsed = time.perf_counter() - t0
    if res.status == 2:
        raise InfeasiblePlanError(diagnose_infeasible(h, m, time_limit_s) if diagnose else [],
                                  "" if diagnose else "MILP proved infeasibility (diagnosis skipped)")
    if res.x is None:
        return MilpResult(None, False, float("inf"), elapsed, m.n_vars, None)
    choices = [opts[int(np.argmax(res.x[idx]))].choice for opts, idx in zip(m.options, m.x_index)]
    gap = getattr(res, "mip_gap", None)
    return MilpResult(choices, res.status == 0, float(res.fun), elapsed, m.n_vars, gap)


def diagnose_infeasible(h: Hierarchy, m: _Model, time_limit_s: float = 30.0) -> list[Violation]:
    """Elastic MILP: one slack per capacity row, minimise the total relative overflow."""
    n_slack = len(m.capacity_rows)
    n_cols = m.n_vars + n_slack
    rows = m.rows
    vals, rr, cc = list(rows.vals), list(rows.rows), list(rows.cols)
    for j, r in enumerate(m.capacity_rows):
        rr.append(r)
        cc.append(m.n_vars + j)
        vals.append(-1.0)
    a = coo_matrix((vals, (rr, cc)), shape=(len(rows.lb), n_cols)).tocsr()
    cost = np.concatenate([np.zeros(m.n_vars), np.ones(n_slack)])
    integrality = np.concatenate([np.ones(m.n_vars), np.zeros(n_slack)])
    res = milp(c=cost, integrality=integrality,
               bounds=Bounds(np.zeros(n_cols), np.concatenate([np.ones(m.n_vars), np.full(n_slack, np.inf)])),
               constraints=LinearConstraint(a, rows.lb, rows.ub), options={"time_limit": time_limit_s})
    if res.x is None:
        return []
    from .evaluate import evaluate  # the referee words the overloads in real units
    choices = [opts[int(np.argmax(res.x[idx]))].choice for opts, idx in zip(m.options, m.x_index)]
    return evaluate(h, choices).violations
