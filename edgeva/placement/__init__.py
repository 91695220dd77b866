"""Edge-hierarchy placement planner: which node runs which part of each query's model.

    h = load_hierarchy("configs/hierarchy.yaml")
    plan = solve(h)                 # exact MILP when small, heuristic when large
    print(plan.explain()); plan.save("plan.yaml")

Modules: model (instance dataclasses), loader (hierarchy file), options (per-query
choices and their costs), evaluate (independent scorer, queueing estimate), milp
(exact), heuristic (large instances), brute (exhaustive, for tests), solve (front
door and naive baselines), plan (Plan and plan file), profiler (profile_model),
cli (``main``/``plan_command`` for ``edgeva plan``).
"""
from .errors import InfeasiblePlanError
from .evaluate import Evaluation, Violation, evaluate, queueing_estimate
from .loader import load_hierarchy, parse_hierarchy
from .model import Hierarchy, Link, ModelProfile, Node, Query, SplitPoint
from .options import Choice
from .plan import Assignment, LinkUsage, NodeUsage, Plan
from .solve import baseline_objectives, naive_choices, solve


def profile_model(*args, **kwargs):  # imported lazily: torch is heavy
    from .profiler import profile_model as _profile_model
    return _profile_model(*args, **kwargs)


profile_model.__doc__ = "See edgeva.placement.profiler.profile_model."


def plan_command(args: list[str]) -> int:
    from .cli import main
    return main(args)


__all__ = [
    "Assignment", "Choice", "Evaluation", "Hierarchy", "InfeasiblePlanError", "Link", "LinkUsage",
    "ModelProfile", "Node", "NodeUsage", "Plan", "Query", "SplitPoint", "Violation",
    "baseline_objectives", "evaluate", "load_hierarchy", "naive_choices", "parse_hierarchy",
    "plan_command", "profile_model", "queueing_estimate", "solve",
]
