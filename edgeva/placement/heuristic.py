"""Placement heuristic for instances too big for the exact MILP.

1. Lagrangian prices: each query picks its cheapest option under
   latency + sum_r price_r * usage_r; prices of overloaded resources rise by
   subgradient steps (J3O-style). Every price vector seeds one construction.
2. Construction: queries in decreasing regret (second-best minus best priced cost)
   take the option that minimises priced cost + BIG * overflow, so a construction
   always completes and overloads are repaired afterwards.
3. Local search on latency + BIG * overflow: 1-moves (re-place one query), then
   2-moves (re-place a query into an option that is blocked by capacity while
   moving one query that uses the blocking resource).
4. The naive plans (all local, all at the root) are also polished when they are
   feasible, so the result is never worse than either.

All resource use is normalised by capacity (1.0 = full); memory counts a weight
segment once per node through a per-segment reference count.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .model import Hierarchy
from .options import Choice, options_for, segment_weight

BIG = 1e6          # penalty per unit of normalised overflow
TOL = 1e-9


@dataclass
class HeuristicResult:
    choices: Optional[list[Choice]]   # None when no feasible plan was found
    objective_ms: float
    solve_time_s: float
    starts: int
    least_overloaded: Optional[list[Choice]] = None   # best attempt when infeasible


class _Instance:
    def __init__(self, h: Hierarchy):
        self.h = h
        opts = [options_for(h, q) for q in h.queries]
        self.choices = [o.choice for os in opts for o in os]
        self.start = np.cumsum([0] + [len(os) for os in opts])
        self.n_queries = len(opts)
        flat = [o for os in opts for o in os]
        total_fps = h.total_fps()
        self.query_of = np.repeat(np.arange(len(opts)), [len(os) for os in opts])
        fps = np.array([q.fps for q in h.queries])
        self.cost = np.array([o.latency_ms for o in flat]) * fps[self.query_of] / total_fps
        node_ids = list(h.nodes)
        self.node_pos = {n: i for i, n in enumerate(node_ids)}
        link_ids = list(h.links)
        n_nodes = len(node_ids)
        self.n_nodes = n_nodes
        self.usage = np.zeros((len(flat), n_nodes + len(link_ids)))
        for i, o in enumerate(flat):
            for n, u in o.compute_util.items():
                self.usage[i, self.node_pos[n]] += u / h.nodes[n].max_util
            for c, b in o.link_bits_per_s.items():
                self.usage[i, n_nodes + link_ids.index(c)] += b / h.links[c].capacity_bits_per_s
        segments = sorted({s for o in flat for s in o.segments})
        seg_pos = {s: i for i, s in enumerate(segments)}
        self.seg_model = [(s[0], s[1]) for s in segments]     # (node, residency key) per segment
        self.seg_node = np.array([self.node_pos[s[0]] for s in segments], dtype=int)
        self.seg_load = np.array([segment_weight(h, s) / max(h.nodes[s[0]].memory_bytes, 1e-9)
                                  for s in segments])
        self.seg_req = np.zeros((len(flat), len(segments)), dtype=bool)
        for i, o in enumerate(flat):
            for s in o.segments:
                self.seg_req[i, seg_pos[s]] = True
        self.seg_to_node = np.zeros((len(segments), n_nodes))
        self.seg_to_node[np.arange(len(segments)), self.seg_node] = 1.0
        # memory an option would take if its model's users on a node shared it evenly: for prices only
        users_per_model = {}
        for q in h.queries:
            key = h.model_of(q).residency_key
            users_per_model[key] = users_per_model.get(key, 0) + 1
        share = np.array([1.0 / users_per_model[h.model_of(h.queries[q]).residency_key] for q in self.query_of])
        self.mem_share = (self.seg_req * self.seg_load) @ self.seg_to_node * share[:, None]

    def slice(self, q: int) -> slice:
        return slice(self.start[q], self.start[q + 1])


class _State:
    def __init__(self, inst: _Instance):
        self.inst = inst
        self.load = np.zeros(inst.usage.shape[1])
        self.seg_count = np.zeros(len(inst.seg_node), dtype=int)
        self.mem = np.zeros(inst.n_nodes)
        self.assign = np.full(inst.n_queries, -1)

    def copy(self) -> "_State":
        s = _State.__new__(_State)
        s.inst, s.load, s.seg_count = self.inst, self.load.copy(), self.seg_count.copy()
        s.mem, s.assign = self.mem.copy(), self.assign.copy()
        return s

    def add(self, q: int, o: int) -> None:
        inst = self.inst
        self.assign[q] = o
        self.load += inst.usage[o]
        req = inst.seg_req[o]
        new = req & (self.seg_count == 0)
        self.mem += np.bincount(inst.seg_node[new], inst.seg_load[new], minlength=inst.n_nodes)
        self.seg_count[req] += 1

    def remove(self, q: int) -> int:
        inst = self.inst
        o = int(self.assign[q])
        self.assign[q] = -1
        self.load -= inst.usage[o]
        req = inst.seg_req[o]
        self.seg_count[req] -= 1
        gone = req & (self.seg_count == 0)
        self.mem -= np.bincount(inst.seg_node[gone], inst.seg_load[gone], minlength=inst.n_nodes)
        return o

    def overflow_if_added(self, q: int) -> np.ndarray:
        """Total normalised overflow for each option of the (unassigned) query q."""
        inst = self.inst
        sl = inst.slice(q)
        load = self.load + inst.usage[sl]
        over = np.maximum(load - 1 - TOL, 0).sum(axis=1)
        new_seg_load = inst.seg_req[sl] * ((self.seg_count == 0) * inst.seg_load)
        mem = self.mem + new_seg_load @ inst.seg_to_node
        return over + np.maximum(mem - 1 - TOL, 0).sum(axis=1)

    def overflow(self) -> float:
        return float(np.maximum(self.load - 1 - TOL, 0).sum() + np.maximum(self.mem - 1 - TOL, 0).sum())

    def latency(self) -> float:
        return float(self.inst.cost[self.assign].sum())

    def score(self) -> float:
        return self.latency() + BIG * self.overflow()


def _best_option(state: _State, q: int, extra_cost: Optional[np.ndarray] = None) -> int:
    inst = state.inst
    sl = inst.slice(q)
    score = inst.cost[sl] + BIG * state.overflow_if_added(q)
    if extra_cost is not None:
        score = score + extra_cost[sl]
    return int(sl.start + np.argmin(score))


def _one_moves(state: _State, deadline: float) -> bool:
    improved_any = False
    for _ in range(50):
        improved = False
        before = state.score()
        for q in range(state.inst.n_queries):
            if time.perf_counter() > deadline and state.overflow() == 0:
                return improved_any or improved
            old = state.remove(q)
            new = _best_option(state, q)
            state.add(q, new)
            if new != old and state.score() > before - 1e-12:   # tie or worse: put it back
                state.remove(q)
                state.add(q, old)
            elif new != old:
                improved = True
                before = state.score()
        improved_any |= improved
        if not improved:
            break
    return improved_any


def _two_moves(state: _State, deadline: float, max_partners: int = 6) -> bool:
    """Move q into a cheaper option blocked by capacity, re-placing one user of the blocker.
    Only on feasible states: overloads are the 1-moves' job."""
    inst = state.inst
    improved = False
    if state.overflow() > 0:
        return False
    for q in range(inst.n_queries):
        if time.perf_counter() > deadline:
            break
        current = int(state.assign[q])
        sl = inst.slice(q)
        better = [o for o in range(sl.start, sl.stop) if inst.cost[o] < inst.cost[current] - 1e-12]
        better.sort(key=lambda o: inst.cost[o])
        for o in better[:4]:
            before = state.score()
            state.remove(q)
            state.add(q, o)
            blocked = np.flatnonzero(state.load > 1 + TOL)
            mem_blocked = np.flatnonzero(state.mem > 1 + TOL)
            if blocked.size == 0 and mem_blocked.size == 0:
                improved = True
                break
            partners = _users_of(state, blocked, mem_blocked, exclude=q)[:max_partners]
            done = False
            for p in partners:
                old_p = state.remove(p)
                state.add(p, _best_option(state, p))
                if state.score() < before - 1e-12:
                    done = True
                    break
                state.remove(p)
                state.add(p, old_p)
            if done:
                improved = True
                break
            state.remove(q)
            state.add(q, current)
    return improved


def _users_of(state: _State, resources: np.ndarray, mem_nodes: np.ndarray, exclude: int) -> list[int]:
    """Queries ordered by how much they use the given resources (heaviest first)."""
    inst = state.inst
    chosen = state.assign
    weight = inst.usage[chosen][:, resources].sum(axis=1) if resources.size else np.zeros(inst.n_queries)
    if mem_nodes.size:
        on_nodes = np.isin(inst.seg_node, mem_nodes)
        weight = weight + (inst.seg_req[chosen][:, on_nodes] * inst.seg_load[on_nodes]).sum(axis=1)
    weight[exclude] = 0.0
    order = np.argsort(-weight, kind="stable")
    return [int(q) for q in order if weight[q] > 0]


def _price_cost(inst: _Instance, prices: np.ndarray) -> np.ndarray:
    r = inst.usage.shape[1]
    return inst.usage @ prices[:r] + inst.mem_share @ prices[r:]


def _construct(inst: _Instance, prices: np.ndarray) -> _State:
    priced = inst.cost + _price_cost(inst, prices)
    regrets = []
    for q in range(inst.n_queries):
        vals = np.sort(priced[inst.slice(q)])
        regrets.append(vals[1] - vals[0] if vals.size > 1 else 0.0)
    state = _State(inst)
    price_cost = _price_cost(inst, prices)
    for q in np.argsort(-np.array(regrets), kind="stable"):
        state.add(int(q), _best_option(state, int(q), extra_cost=price_cost))
    return state


def _pair_repair(state: _State, deadline: float, max_users: int = 12) -> bool:
    """Re-place two users of an overloaded resource together (both orders); for overloads
    that no single move can clear, e.g. two queries that must swap nodes."""
    if state.overflow() == 0:
        return False
    improved = False
    blocked = np.flatnonzero(state.load > 1 + TOL)
    mem_blocked = np.flatnonzero(state.mem > 1 + TOL)
    users = _users_of(state, blocked, mem_blocked, exclude=-1)[:max_users]
    others = list(range(state.inst.n_queries))
    if len(others) > 40:    # bound the pair neighbourhood on big instances
        others = [int(q) for q in np.random.default_rng(len(users)).choice(others, 40, replace=False)]
    for a in users:
        for b in others:
            if a == b or time.perf_counter() > deadline:
                continue
            before = state.score()
            old_a, old_b = state.remove(a), state.remove(b)
            for first, second in ((a, b), (b, a)):
                state.add(first, _best_option(state, first))
                state.add(second, _best_option(state, second))
                if state.score() < before - 1e-12:
                    improved = True
                    break
                state.remove(first)
                state.remove(second)
            else:
                state.add(a, old_a)
                state.add(b, old_b)
                continue
            if state.overflow() == 0:
                return True
    return improved


def _evict_repair(state: _State, deadline: float) -> bool:
    """Memory overload that only clears when *every* user of a model on a node moves:
    evict one model from an overloaded node and re-place its users elsewhere."""
    inst = state.inst
    improved = False
    for node in np.flatnonzero(state.mem > 1 + TOL):
        node_id = list(inst.h.nodes)[node]
        on_node = [i for i, ((n, _), c) in enumerate(zip(inst.seg_model, state.seg_count)) if n == node_id and c > 0]
        groups = [np.array([inst.seg_model[j] == inst.seg_model[i] for j in range(len(inst.seg_model))])
                  for i in on_node]                                 # a whole model...
        groups += [np.arange(len(inst.seg_model)) == i for i in on_node]   # ...or one segment of it
        for segs in groups:
            if time.perf_counter() > deadline:
                return improved
            needs = inst.seg_req[:, segs].any(axis=1)
            users = [q for q in range(inst.n_queries) if needs[state.assign[q]]]
            before = state.score()
            old = {q: state.remove(q) for q in users}
            forbid = np.where(needs, 1e3 * BIG, 0.0)
            for q in sorted(users, key=lambda q: -inst.h.queries[q].fps):
                state.add(q, _best_option(state, q, extra_cost=forbid))
            if state.score() < before - 1e-12:
                improved = True
                break
            for q in users:
                state.remove(q)
            for q, o in old.items():
                state.add(q, o)
    return improved


def _polish(state: _State, deadline: float) -> _State:
    for _ in range(20):
        a = _one_moves(state, deadline)
        a |= _evict_repair(state, deadline)
        a |= _pair_repair(state, deadline)
        b = _two_moves(state, deadline)
        if not (a or b) or time.perf_counter() > deadline:
            break
    return state


def _naive_state(inst: _Instance, where: str) -> _State:
    state = _State(inst)
    for q in range(inst.n_queries):
        sl = inst.slice(q)
        query = inst.h.queries[q]
        top = inst.h.path_up(query.source)[-1]
        for o in range(sl.start, sl.stop):
            c = inst.choices[o]
            last = inst.h.model_of(query).last_split
            whole_at = c.head if (c.split in (0, last) and c.head == c.tail) else None
            target = query.source if where == "local" else top
            if whole_at == target:
                state.add(q, o)
                break
    return state


def solve_heuristic(h: Hierarchy, iterations: int = 8, time_budget_s: float = 3.0,
                    seed: int = 0) -> HeuristicResult:
    t0 = time.perf_counter()
    deadline = t0 + time_budget_s
    inst = _Instance(h)
    rng = np.random.default_rng(seed)
    best: Optional[_State] = None
    starts = 0

    def consider(state: _State) -> None:
        nonlocal best, starts
        starts += 1
        assert (state.assign >= 0).all(), "every query must have an option"
        _polish(state, deadline)
        if best is None or state.score() < best.score() - 1e-12:
            best = state

    for where in ("local", "root"):
        naive = _naive_state(inst, where)
        if naive.overflow() == 0:
            consider(naive)
    prices = np.zeros(inst.usage.shape[1] + inst.n_nodes)     # compute+links, then memory
    scale = float(np.median(inst.cost)) if inst.cost.size else 1.0
    # a unit price step should shift choices of a typical user of the resource
    all_usage = np.concatenate([inst.usage, inst.mem_share], axis=1)
    typical = np.array([np.mean(col[col > 0]) if np.any(col > 0) else 1.0 for col in all_usage.T])
    for it in range(iterations):
        consider(_construct(inst, prices))
        if time.perf_counter() - t0 > time_budget_s:
            break
        # subgradient on the relaxation where every query takes its priced-cheapest option
        priced = inst.cost + _price_cost(inst, prices)
        relaxed = _State(inst)
        for q in range(inst.n_queries):
            sl = inst.slice(q)
            relaxed.add(q, sl.start + int(np.argmin(priced[sl])))
        load = np.concatenate([relaxed.load, relaxed.mem])
        if np.all(load <= 1 + TOL) and it > 0:
            break   # the priced relaxation already fits: further prices repeat this start
        step = scale * 2.0 / (1 + it) * (1 + 0.1 * rng.standard_normal())
        prices = np.maximum(0.0, prices + step * (load - 1) / typical)
    assert best is not None
    elapsed = time.perf_counter() - t0
    if best.overflow() > 0:
        return HeuristicResult(None, float("inf"), elapsed, starts,
                               [inst.choices[o] for o in best.assign])
    return HeuristicResult([inst.choices[o] for o in best.assign], best.latency(), elapsed, starts)
