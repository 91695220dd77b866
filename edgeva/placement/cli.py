"""``edgeva plan``: solve a hierarchy file, print the explanation, optionally save the plan."""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from edgeva.config import ConfigError

from .errors import InfeasiblePlanError
from .loader import load_hierarchy
from .solve import solve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgeva plan", description="Place query models on the edge hierarchy.")
    p.add_argument("hierarchy", nargs="?", default="configs/hierarchy.yaml", help="hierarchy YAML file")
    p.add_argument("--method", choices=["auto", "exact", "heuristic", "brute"], default="auto")
    p.add_argument("--time-limit", type=float, default=30.0, help="MILP time limit in seconds")
    p.add_argument("-o", "--output", help="write the plan file (.yaml/.yml or .json)")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    """Exit codes: 0 plan found, 1 infeasible, 2 bad hierarchy file."""
    args = build_parser().parse_args(argv)
    try:
        h = load_hierarchy(args.hierarchy)
        plan = solve(h, args.method, args.time_limit)
    except ConfigError as exc:
        print(f"{args.hierarchy}: {exc}", file=sys.stderr)
        return 2
    except InfeasiblePlanError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(plan.explain())
    if args.output:
        plan.save(args.output)
        print(f"plan written to {args.output}")
    return 0


plan_command = main

if __name__ == "__main__":
    raise SystemExit(main())
