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


def tiered_hierarchy(rng: np.random.Generator, n_queries: int, n_split_points: int = 5, n_models: int = 3,
                     tightness: float = 1.0) -> Hierarchy:
    """cloud -> 2 regionals -> 2 edge servers each -> cameras (2 queries per camera on average).
    Edge and regional capacity is sized for the load below them, divided by ``tightness``."""
    n_cameras = max(2, n_queries // 2)
    per_edge = n_queries / 4
    nodes: dict[str, Node] = {"cloud": Node("cloud", 100_000 * MB, 20.0 * max(1.0, per_edge / 4), 0.8, "cloud")}
    links: dict[str, Link] = {}

    def add(node: Node, parent: str, mbps: float, rtt: float) -> None:
        nodes[node.id] = node
        links[node.id] = Link(node.id, parent, mbps, rtt)

    for r in range(2):
        add(Node(f"reg{r}", int(8000 * MB), float(rng.uniform(2, 4)) * per_edge / tightness, 0.8, "regional"),
            "cloud", 1000.0 * max(1.0, per_edge / 8) / tightness, float(rng.uniform(25, 45)))
        for e in range(2):
            add(Node(f"edge{r}{e}", int(rng.uniform(100, 400) * MB / tightness),
                     float(rng.uniform(0.5, 1.5)) * per_edge / tightness, 0.7, "edge"),
                f"reg{r}", float(rng.uniform(100, 400)) * max(1.0, per_edge / 8) / tightness,
                float(rng.uniform(4, 12)))
    edges = [n for n in nodes if n.startswith("edge")]
    for c in range(n_cameras):
        add(Node(f"cam{c}", int(rng.uniform(20, 80) * MB), float(rng.uniform(0.1, 2.0)), 0.8, "camera"),
            edges[c % len(edges)], float(rng.uniform(10, 60)), float(rng.uniform(1, 5)))
    models = {f"m{j}": random_profile(rng, f"m{j}", n_split_points) for j in range(n_models)}
    queries = [Query(f"q{i}", f"cam{int(rng.integers(0, n_cameras))}", f"m{int(rng.integers(0, n_models))}",
                     float(rng.uniform(1, 15)), int(rng.uniform(2e4, 2e5))) for i in range(n_queries)]
    for c in range(n_cameras):   # camera uplinks sized around the raw-frame load they carry
        demand = sum(8e-6 * q.fps * q.frame_bytes for q in queries if q.source == f"cam{c}")
        links[f"cam{c}"].bandwidth_mbps = 2.0 + demand * float(rng.uniform(0.8, 2.0))
    return Hierarchy(nodes, links, models, queries, "synthetic tiered")
