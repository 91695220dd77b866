#!/usr/bin/env python3
"""Placement planner benchmark: solve time vs instance size, heuristic gap, naive baselines.

    .venv/bin/python tools/bench_planner.py [--sizes 4 8 16 32 50 100 200] [--seeds 3] [--time-limit 30]

Instances are edgeva.placement.synthetic.tiered_hierarchy trees (cloud, 2 regionals,
4 edge servers, queries/2 cameras; 5 split points, 3 models, tightness 0.8-1.6);
infeasible draws are skipped and redrawn. Gap = heuristic / exact - 1, over instances the MILP solved to optimality.
Baseline ratios = baseline latency / best plan latency (median over the seeds where the
baseline is feasible; "inf n/s" counts seeds where it is not).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeva.placement import InfeasiblePlanError, baseline_objectives  # noqa: E402
from edgeva.placement.heuristic import solve_heuristic  # noqa: E402
from edgeva.placement.milp import solve_milp  # noqa: E402
from edgeva.placement.solve import option_count  # noqa: E402
from edgeva.placement.synthetic import tiered_hierarchy  # noqa: E402


def feasible_instance(rng: np.random.Generator, n_queries: int):
    for _ in range(50):
        h = tiered_hierarchy(rng, n_queries, n_split_points=5, n_models=3, tightness=float(rng.uniform(0.8, 1.6)))
        try:
            exact = solve_milp(h, time_limit_s=ARGS.time_limit, diagnose=False)
        except InfeasiblePlanError:
            continue
        if exact.choices is not None:
            return h, exact
        # time limit without any solution: draw another
    raise RuntimeError(f"no feasible instance with {n_queries} queries")


def ratio_cell(values: list[float | None]) -> str:
    ok = [v for v in values if v is not None]
    cell = f"{statistics.median(ok):.2f}x" if ok else "-"
    missing = len(values) - len(ok)
    return cell + (f" inf {missing}/{len(values)}" if missing else "")


def main() -> None:
    rows = []
    header = ("queries", "nodes", "options", "exact ms (med/max)", "optimal", "heur ms (med/max)",
              "gap mean/max", "all_local", "all_on_strongest")
    for n_queries in ARGS.sizes:
        rng = np.random.default_rng(1000 + n_queries)
        exact_t, heur_t, gaps, optimal, local, strongest, options = [], [], [], 0, [], [], []
        nodes = 0
        for _ in range(ARGS.seeds):
            h, exact = feasible_instance(rng, n_queries)
            nodes = len(h.nodes)
            options.append(option_count(h))
            exact_t.append(exact.solve_time_s * 1e3)
            optimal += exact.optimal
            heur = solve_heuristic(h)
            heur_t.append(heur.solve_time_s * 1e3)
            best = min(exact.objective_ms, heur.objective_ms)
            if exact.optimal:
                gaps.append(heur.objective_ms / exact.objective_ms - 1 if heur.choices else float("inf"))
            base = baseline_objectives(h)
            local.append(None if base["all_local"] is None else base["all_local"] / best)
            strongest.append(None if base["all_on_strongest"] is None else base["all_on_strongest"] / best)
        finite = [g for g in gaps if np.isfinite(g)]
        gap_cell = (f"{np.mean(finite):.2%}/{np.max(finite):.2%}" if finite else "-") + (
            f" miss {len(gaps) - len(finite)}" if len(finite) < len(gaps) else "")
        rows.append((str(n_queries), str(nodes), str(int(np.median(options))),
                     f"{statistics.median(exact_t):.0f}/{max(exact_t):.0f}", f"{optimal}/{ARGS.seeds}",
                     f"{statistics.median(heur_t):.0f}/{max(heur_t):.0f}", gap_cell,
                     ratio_cell(local), ratio_cell(strongest)))
        print(" | ".join(rows[-1]), file=sys.stderr, flush=True)
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("-+-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16, 32, 50, 100, 200])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--time-limit", type=float, default=30.0)
    ARGS = parser.parse_args()
    t0 = time.perf_counter()
    main()
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")
