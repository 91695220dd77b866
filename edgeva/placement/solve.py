"""Front door of the planner: pick a solver, compare with the naive plans, build the Plan."""
from __future__ import annotations

import time
from typing import Literal, Optional

from .brute import solve_brute_force
from .errors import InfeasiblePlanError
from .evaluate import evaluate
from .heuristic import solve_heuristic
from .milp import solve_milp
from .model import Hierarchy
from .options import Choice, canonical_choices
from .plan import Plan

Method = Literal["auto", "exact", "heuristic", "brute"]
EXACT_MAX_OPTIONS = 6000     # above this many x-variables 'auto' goes straight to the heuristic


def naive_choices(h: Hierarchy, kind: str) -> list[Choice]:
    """'all_local': whole model on the camera's node. 'all_on_strongest': raw frame sent to
    the fastest node on the way up (ties go higher; usually the cloud), whole model there."""
    out: list[Choice] = []
    for q in h.queries:
        model = h.model_of(q)
        if kind == "all_local":
            out.append(Choice(q.source, q.source, model.last_split))
        elif kind == "all_on_strongest":
            path = h.path_up(q.source)
            strongest = max(reversed(path), key=lambda n: h.nodes[n].speed_for(model))
            out.append(Choice(strongest, strongest, 0 if strongest != q.source else model.last_split))
        else:
            raise ValueError(f"unknown baseline {kind!r}")
    return out


def baseline_objectives(h: Hierarchy) -> dict[str, Optional[float]]:
    result: dict[str, Optional[float]] = {}
    for kind in ("all_local", "all_on_strongest"):
        ev = evaluate(h, naive_choices(h, kind))
        result[kind] = ev.objective_ms if ev.feasible else None
    return result


def option_count(h: Hierarchy) -> int:
    return sum(len(canonical_choices(h, q)) for q in h.queries)


def solve(h: Hierarchy, method: Method = "auto", time_limit_s: float = 30.0,
          with_baselines: bool = True) -> Plan:
    """Best plan found by ``method``; raises ``InfeasiblePlanError`` naming the overloads."""
    if not h.queries:
        raise ValueError("no queries to place")
    t0 = time.perf_counter()
    notes: list[str] = []
    if method == "auto":
        method = "exact" if option_count(h) <= EXACT_MAX_OPTIONS else "heuristic"
        notes.append(f"auto chose the {method} solver ({option_count(h)} options)")
    choices: Optional[list[Choice]]
    optimal = False
    if method == "brute":
        found = solve_brute_force(h)
        if found is None:
            solve_milp(h, time_limit_s)        # raises with the diagnosis
            raise InfeasiblePlanError([], "brute force found no feasible plan")
        choices, optimal = found[0], True
    elif method == "exact":
        res = solve_milp(h, time_limit_s)
        choices, optimal = res.choices, res.optimal
        if not optimal:
            heur = solve_heuristic(h)
            notes.append(f"MILP stopped at the {time_limit_s:.0f} s limit; kept the better of it and the heuristic")
            if heur.choices is not None and (choices is None or heur.objective_ms < res.objective_ms):
                choices = heur.choices
        if choices is None:
            raise InfeasiblePlanError([], f"no feasible plan found within {time_limit_s} s")
    elif method == "heuristic":
        heur = solve_heuristic(h)
        choices = heur.choices
        if choices is None and option_count(h) <= EXACT_MAX_OPTIONS:
            # the heuristic can miss tight feasible plans; settle it exactly (and name the overload)
            res = solve_milp(h, time_limit_s)
            choices, optimal = res.choices, res.optimal
            notes.append("heuristic found no feasible plan; the MILP did")
        if choices is None:
            violations = evaluate(h, heur.least_overloaded or []).violations if heur.least_overloaded else []
            raise InfeasiblePlanError(violations, "heuristic found no feasible plan")
    else:
        raise ValueError(f"unknown method {method!r}")
    elapsed = time.perf_counter() - t0
    baselines = baseline_objectives(h) if with_baselines else {}
    return Plan.from_choices(h, choices, method, optimal, elapsed, baselines, notes)
