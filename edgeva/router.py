"""Where each query runs: here, on another tier, or split between the two.

The route comes from, in order: the query's own `placement` (a tier, a list of tiers, or
'local'), the placement plan (a plan file written by `edgeva plan`, or `auto`: the hierarchy
solved at start-up), or local execution. Tiers are the config's `tiers`, named like the
hierarchy's nodes so a plan's node names map onto them.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

from edgeva.config import Config, ConfigError
from edgeva.models.splits import SplitSpec

log = logging.getLogger("edgeva.router")


@dataclass(frozen=True)
class Route:
    tiers: tuple[str, ...] = ()          # empty: run locally
    split_at: Optional[SplitSpec] = None   # run the model here up to this split point, the rest on the tier
    reason: str = "default"

    @property
    def local(self) -> bool:
        return not self.tiers

    def describe(self) -> str:
        if self.local:
            return f"local ({self.reason})"
        where = ", ".join(self.tiers)
        split = f", split at {self.split_at!r}" if self.split_at else ""
        return f"offload to {where}{split} ({self.reason})"


def plan_routes(cfg: Config) -> dict[str, Route]:
    """One route per query of the config; raises ConfigError when a plan does not fit the config."""
    routes = {q.id: Route() for q in cfg.queries}
    plan = _load_plan(cfg)
    if plan is not None:
        tier_names = {t.name for t in cfg.tiers}
        for a in plan.assignments:
            if a.query in routes:
                routes[a.query] = _route_from_assignment(a, cfg.placement.node, tier_names)
    for q in cfg.queries:
        if q.placement is None:
            continue
        if q.placement == "local" or q.placement == ["local"]:
            routes[q.id] = Route(reason="query placement")
        else:
            tiers = (q.placement,) if isinstance(q.placement, str) else tuple(q.placement)
            routes[q.id] = Route(tiers, q.split_at, "query placement")
    return routes


def _load_plan(cfg: Config) -> Any:
    if cfg.placement.plan == "local":
        return None
    from edgeva.placement import InfeasiblePlanError, Plan, load_hierarchy, solve

    if cfg.placement.plan == "auto":
        try:
            plan = solve(load_hierarchy(cfg.placement.hierarchy))
        except InfeasiblePlanError as exc:
            raise ConfigError("placement.hierarchy", f"no feasible placement: {exc}") from None
        log.info("placement solved (%s): mean latency %.1f ms", plan.solver, plan.objective_ms)
        return plan
    try:
        return Plan.load(cfg.placement.plan)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError("placement.plan", f"cannot read plan {cfg.placement.plan}: {exc}") from None


def _route_from_assignment(a: Any, this_node: Optional[str], tier_names: set[str]) -> Route:
    here = this_node or a.source
    if a.tail_node == here:
        return Route(reason="plan")
    if a.tail_node not in tier_names:
        raise ConfigError("placement.plan", f"query {a.query!r} is planned on node {a.tail_node!r}, "
                                            f"but no tier of that name is configured")
    if a.head_node == here and a.split > 0:
        # The plan's split index counts the profile's split points; the name is the layer the
        # cut follows, which is what the daemon resolves against the model it runs.
        return Route((a.tail_node,), a.split_name, "plan")
    if a.head_node not in (here, a.tail_node):
        log.warning("query %s: the plan splits it between %s and %s; edgeva sends it whole to %s",
                    a.query, a.head_node, a.tail_node, a.tail_node)
    return Route((a.tail_node,), None, "plan")
