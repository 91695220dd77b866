"""Random planning instances for tests and the benchmark (seeded, reproducible)."""
from __future__ import annotations

import numpy as np

from .model import MB, Hierarchy, Link, ModelProfile, Node, Query, SplitPoint


def random_profile(rng: np.random.Generator, name: str, n_split_points: int) -> ModelProfile:
    """A model with ``n_split_points`` cut positions (input and output included)."""
    n_segments = n_split_points - 1
    seg_ms = rng.uniform(5, 60, n_segments)
    seg_w = rng.uniform(1, 40, n_segments) * MB
    cum_ms = np.concatenate([[0.0], np.cumsum(seg_ms)])
    cum_w = np.concatenate([[0.0], np.cumsum(seg_w)]).astype(int)
    total_ms, total_w = float(cum_ms[-1]), int(cum_w[-1])
    points = []
    for k in range(n_split_points):
        act = 0 if k == 0 else int(rng.uniform(5e3, 4e5)) if k < n_segments else 2000
        points.append(SplitPoint("input" if k == 0 else f"l{k}", float(cum_ms[k]), total_ms - float(cum_ms[k]),
                                 act, int(cum_w[k]), total_w - int(cum_w[k])))
    return ModelProfile(name, points, source="synthetic")


def random_hierarchy(rng: np.random.Generator, n_nodes: int, n_queries: int, n_split_points: int = 3,
                     n_models: int = 2, tightness: float = 1.0) -> Hierarchy:
    """Node 0 is the root (cloud); node i > 0 hangs under a random earlier node, so
    deeper nodes are usually cameras. ``tightness`` > 1 shrinks every capacity."""
    nodes: dict[str, Node] = {}
    links: dict[str, Link] = {}
    depth = [0]
    crowd = max(1.0, n_queries / n_nodes)     # capacities grow with queries per node
    for i in range(n_nodes):
        if i > 0:
            parent = int(rng.integers(0, i))
            depth.append(depth[parent] + 1)
        d = depth[i]
        speed = float(rng.uniform(4, 12) / (3.0 ** d)) * crowd
        memory = float(rng.uniform(30, 300) * (4.0 ** -d) * 4) * MB / tightness
        nodes[f"n{i}"] = Node(f"n{i}", int(memory), speed, float(rng.uniform(0.5, 0.9)) / tightness)
        if i > 0:
            links[f"n{i}"] = Link(f"n{i}", f"n{parent}", float(rng.uniform(5, 100)) * crowd / tightness,
                                  float(rng.uniform(1, 40)), 1.0)
    models = {f"m{j}": random_profile(rng, f"m{j}", n_split_points) for j in range(n_models)}
    names = list(nodes)
    queries = [Query(f"q{i}", names[int(rng.integers(0, n_nodes))], f"m{int(rng.integers(0, n_models))}",
                     float(rng.uniform(1, 15)), int(rng.uniform(2e4, 2e5))) for i in range(n_queries)]
    return Hierarchy(nodes, links, models, queries, "synthetic")
