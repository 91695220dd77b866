"""Swap-aware time sharing of one executor thread across models under a memory budget.

Per-model queues; each turn picks the model to run next by deadline urgency and swap cost
(frames served per second of load + run, among models that would not make the most urgent
one miss its deadline), sizes its batch from the profiled latency under the batch's
earliest deadline, tells the memory manager the expected order of upcoming models (Belady
eviction keeps what is needed soonest, e.g. layers shared with the next model) and runs the
batch while the model's missing blocks stream in. Frames that can no longer meet their
deadline are dropped with DropReason.DEADLINE; every submitted item gets exactly one
callback: `owner.complete` or `owner.dropped`.

`port(key)` offers the surface ModelQuery uses on a ModelWorker (`key`, `model`, `submit`).
"""
from __future__ import annotations

import enum
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch

from edgeva.memory import (DEFAULT_BANDWIDTH_BYTES_PER_S, DEFAULT_GROUP_MIN_BYTES, EvictionPolicy,
                           Granularity, MemoryEvent, MemoryManager)
from edgeva.messages import DropReason
from edgeva.models.base import ZooModel
from edgeva.work import (
    BatchPlan, LatencyProfile, RecentOutputs, WorkItem, costs_a_run, deliver,
    drop_item, plan_batch, predict_each_frame_once, take,
)

log = logging.getLogger("edgeva.scheduler")
T = TypeVar("T")

_MIN_COST_S = 1e-4
# A model whose profile has kept it from running this long gets its profile ignored for one
# turn, so a latency measured in a slow moment cannot starve it for good.
_REPROBE_AFTER_S = 2.0


class ExecutionOrder(str, enum.Enum):
    SWAP_AWARE = "swap-aware"
    ROUND_ROBIN = "round-robin"


@dataclass(frozen=True)
class SwapOptions:
    bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH_BYTES_PER_S   # simulated on the CPU
    simulate_transfer: bool = True
    granularity: Granularity = Granularity.BLOCK
    eviction: EvictionPolicy = EvictionPolicy.BELADY
    pipelined: bool = True
    order: ExecutionOrder = ExecutionOrder.SWAP_AWARE
    max_batch: int = 8
    capacity: int = 64                       # per model queue
    group_min_bytes: int = DEFAULT_GROUP_MIN_BYTES
    # CPU only: real device copies that read as NaN until waited on (see transfer.py).
    simulate_copies: bool = False


@dataclass
class _SLACounts:
    submitted: int = 0
    within_sla: int = 0
    late: int = 0                                 # completed after its deadline
    dropped: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        done = self.within_sla + self.late + sum(self.dropped.values())
        return {"submitted": self.submitted, "within_sla": self.within_sla, "late": self.late,
                "dropped": dict(self.dropped),
                "within_sla_fraction": round(self.within_sla / done, 4) if done else None}


@dataclass(eq=False)
class _ModelState:
    key: str
    model: ZooModel
    queue: deque = field(default_factory=deque)
    profile: LatencyProfile = field(default_factory=LatencyProfile)
    counts: _SLACounts = field(default_factory=_SLACounts)
    batches: int = 0
    frames: int = 0
    batch_sizes: deque = field(default_factory=lambda: deque(maxlen=200))
    recent: RecentOutputs = field(default_factory=RecentOutputs)   # frames already run: not run again
    last_run: Optional[float] = None
    last_arrival: Optional[float] = None
    interarrival_s: Optional[float] = None        # EMA
    slack_s: float = 0.0                          # EMA of deadline - arrival

    def note_arrival(self, item: WorkItem) -> None:
        now = item.enqueued_mono
        if self.last_arrival is not None:
            gap = max(0.0, now - self.last_arrival)
            self.interarrival_s = gap if self.interarrival_s is None else 0.8 * self.interarrival_s + 0.2 * gap
        self.last_arrival = now
        self.slack_s = 0.8 * self.slack_s + 0.2 * (item.deadline_mono - now) if self.counts.submitted \
            else item.deadline_mono - now


class ModelPort:
    """What a query holds instead of a ModelWorker when models share the memory budget."""

    runs_each_frame_once = True        # predict_each_frame_once with the model's RecentOutputs

    def __init__(self, scheduler: "SwapScheduler", key: str, model: ZooModel):
        self._scheduler = scheduler
        self.key = key
        self.model = model

    def submit(self, item: WorkItem, wait_s: float = 0.0) -> bool:
        """Queue an item, retrying up to `wait_s` while the queue is full; False when it stayed
        full or the scheduler stopped."""
        give_up = time.monotonic() + wait_s
        while not self._scheduler.submit(self.key, item):
            if self._scheduler.stopping or time.monotonic() >= give_up:
                return False
            time.sleep(0.005)
        return True

    def stats(self) -> dict[str, Any]:
        return self._scheduler.model_stats(self.key)

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` (which uses this model's module, e.g. a split head) with its weights on the
        device, between the scheduler's batches: the memory manager serialises runs."""
        return self._scheduler.memory.run(self.key, fn)[0]


@dataclass(frozen=True)
class _Plan:
    state: _ModelState
    batch: list[WorkItem]
    late: list[WorkItem]
    cost_s: float


class SwapScheduler:
    """One executor thread time-shared by `models`, whose weights share `budget_bytes`.

    Raises ModelTooLargeError at construction when a model alone exceeds the budget."""

    def __init__(self, models: dict[str, ZooModel], budget_bytes: int, *,
                 device: Optional[torch.device | str] = None, options: SwapOptions = SwapOptions(),
                 listeners: Sequence[Callable[[MemoryEvent], None]] = (),
                 clock: Callable[[], float] = time.monotonic):
        if not models:
            raise ValueError("SwapScheduler needs at least one model")
        for key, model in models.items():
            if model.module is None:
                raise ValueError(f"model {key!r} ({model.name}) is not a torch module; "
                                 f"gpu.memory_budget_mb needs torch models it can swap layer by layer")
        self.options = options
        self.clock = clock
        self.device = torch.device(device) if device is not None else next(iter(models.values())).device
        self.memory = MemoryManager(budget_bytes, self.device,
                                    bandwidth_bytes_per_s=options.bandwidth_bytes_per_s,
                                    simulate_transfer=options.simulate_transfer,
                                    granularity=options.granularity, eviction=options.eviction,
                                    pipelined=options.pipelined, group_min_bytes=options.group_min_bytes,
                                    listeners=listeners, clock=clock,
                                    simulate_copies=options.simulate_copies)
        try:
            for key, model in models.items():
                self.memory.register(key, model.module)
        except Exception:
            self.memory.close()
            raise
        self._states = {key: _ModelState(key, model) for key, model in models.items()}
        self._ports = {key: ModelPort(self, key, model) for key, model in models.items()}
        self._per_query: dict[str, _SLACounts] = {}
        self._round_robin_next = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="swap-scheduler", daemon=True)

    # ------------------------------------------------------------------ public surface
    @property
    def stopping(self) -> bool:
        return self._stopping

    def port(self, key: str) -> ModelPort:
        return self._ports[key]

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, key: str, item: WorkItem) -> bool:
        state = self._states[key]
        with self._cond:
            if self._stopping or (len(state.queue) >= self.options.capacity
                                  and costs_a_run(item, state.queue, state.recent)):
                return False
            state.note_arrival(item)
            state.counts.submitted += 1
            self._query_counts(item).submitted += 1
            state.queue.append(item)
            self._cond.notify()
            return True

    def stop(self, timeout_s: float = 4.0) -> None:
        """Finish the running batch, then drop everything still queued with `shutdown`."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        with self._cond:
            left: list[tuple[_ModelState, WorkItem]] = []
            for state in self._states.values():
                left.extend((state, item) for item in state.queue)
                state.queue.clear()
        for state, item in left:
            self._drop(state, item, DropReason.SHUTDOWN)
        if not self._thread.is_alive():
            self.memory.close()

    def pending(self) -> int:
        with self._cond:
            return sum(len(s.queue) for s in self._states.values())

    def model_stats(self, key: str) -> dict[str, Any]:
        state = self._states[key]
        with self._cond:
            sizes = list(state.batch_sizes)
            out = {"queued": len(state.queue), "batches": state.batches, "frames": state.frames,
                   "outputs_reused": state.recent.reused,
                   "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None,
                   "per_frame_ms": None if state.profile.per_item_s is None
                   else round(state.profile.per_item_s * 1e3, 2),
                   "fixed_ms": round(state.profile.fixed_s * 1e3, 2),
                   **state.counts.as_dict()}
        memory = self.memory.stats()["models"][key]
        out.update({"weights_bytes": memory["bytes"], "resident_bytes": memory["resident_bytes"],
                    "loads": memory["loads"], "bytes_loaded": memory["bytes_loaded"]})
        return out

    def stats(self) -> dict[str, Any]:
        memory = self.memory.stats()
        memory.pop("models")
        with self._cond:
            queries = {q: c.as_dict() for q, c in self._per_query.items()}
        return {"order": self.options.order.value, "max_batch": self.options.max_batch,
                "memory": memory, "models": {k: self.model_stats(k) for k in self._states},
                "queries": queries}

    # ------------------------------------------------------------------ executor loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not any(s.queue for s in self._states.values()):
                    self._cond.wait(timeout=0.5)
                if self._stopping:
                    return
                now = self.clock()
                late = self._take_hopeless(now)
                plan = self._choose(now)
                if plan is not None:
                    late.extend((plan.state, item) for item in plan.late)
                    late.extend(self._take_all_late(now) if not plan.batch else [])
                upcoming = self._upcoming(now)
            for state, item in late:
                self._drop(state, item, DropReason.DEADLINE)
            if plan is not None and plan.batch:
                self.memory.set_upcoming(upcoming)
                self._execute(plan.state, plan.batch)

    def _take_hopeless(self, now: float) -> list[tuple[_ModelState, WorkItem]]:
        """Items that would miss their deadline even with their model already resident."""
        out = []
        for state in self._states.values():
            alone = self._predict_run(state, 1, now)
            if any(now + alone > item.deadline_mono for item in state.queue):
                keep = deque()
                for item in state.queue:
                    (out.append((state, item)) if now + alone > item.deadline_mono else keep.append(item))
                state.queue = keep
        return out

    def _choose(self, now: float) -> Optional[_Plan]:
        candidates = [s for s in self._states.values() if s.queue]
        if not candidates:
            return None
        if self.options.order is ExecutionOrder.ROUND_ROBIN:
            keys = list(self._states)
            for step in range(len(keys)):
                index = (self._round_robin_next + step) % len(keys)
                state = self._states[keys[index]]
                if state.queue:
                    self._round_robin_next = index + 1
                    return self._take_batch(state, now)
            return None
        plans = [self._plan_batch(s, now) for s in candidates]
        with_batch = [p for p in plans if p.batch]
        if not with_batch:          # everything queued is late (the loop drops it)
            return _Plan(candidates[0], [], [], 0.0)
        # The most urgent model: least slack between its earliest deadline and its cost.
        urgent = min(with_batch, key=lambda p: p.batch[0].deadline_mono - now - p.cost_s)
        urgent_alone = self._cost(urgent.state, 1)
        feasible = [p for p in with_batch
                    if p is urgent or now + p.cost_s + urgent_alone <= urgent.batch[0].deadline_mono]
        best = max(feasible, key=lambda p: (len(p.batch) / max(p.cost_s, _MIN_COST_S),
                                            -p.batch[0].deadline_mono))
        return self._take_batch(best.state, now)

    def _cost(self, state: _ModelState, batch: int) -> float:
        run_s = state.profile.predict(batch)
        return self.memory.predicted_exposed_load_s(state.key, run_s) + run_s

    def _predict_run(self, state: _ModelState, batch: int, now: float) -> float:
        if state.last_run is not None and now - state.last_run > _REPROBE_AFTER_S:
            return 0.0
        return state.profile.predict(batch)

    def _plan_batch(self, state: _ModelState, now: float) -> _Plan:
        """The batch this model would run now (`edgeva.work.plan_batch`), counting the load
        of its missing weights that running cannot hide."""
        def run_s(n: int) -> float:
            return self._predict_run(state, n, now)

        # A model that has not run for a while is probed even if its load looks too slow for
        # the deadlines: otherwise it would never load, and the prediction would never change.
        stale = state.last_run is None or now - state.last_run > _REPROBE_AFTER_S
        exposed = self.memory.predicted_exposed_load_s(state.key, run_s(1))
        plan = plan_batch(state.queue, now, self.options.max_batch, run_s, load_s=exposed,
                          trust_prediction=not stale)
        return _Plan(state, plan.batch, plan.late, exposed + run_s(max(1, plan.images)))

    def _take_batch(self, state: _ModelState, now: float) -> _Plan:
        plan = self._plan_batch(state, now)
        take(state.queue, BatchPlan(plan.batch, plan.late))
        return plan

    def _take_all_late(self, now: float) -> list[tuple[_ModelState, WorkItem]]:
        late = []
        for state in self._states.values():
            plan = self._take_batch(state, now) if state.queue else None
            if plan is not None:
                late.extend((state, item) for item in plan.late)
                state.queue.extendleft(reversed(plan.batch))
        return late

    def _upcoming(self, now: float) -> list[str]:
        """Expected order of the next runs, soonest first, for Belady eviction."""
        if self.options.order is ExecutionOrder.ROUND_ROBIN:
            keys = list(self._states)
            start = self._round_robin_next % len(keys)
            return keys[start:] + keys[:start]

        def next_need(state: _ModelState) -> float:
            if state.queue:
                return min(i.deadline_mono for i in state.queue) - self._cost(state, 1)
            if state.last_arrival is None:
                return float("inf")
            gap = state.interarrival_s or 0.0
            return max(now, state.last_arrival + gap) + state.slack_s - self._cost(state, 1)

        return sorted(self._states, key=lambda k: (next_need(self._states[k]), k))

    def _execute(self, state: _ModelState, batch: list[WorkItem]) -> None:
        def run() -> tuple[list[Any], int]:
            return predict_each_frame_once(state.model.predict, batch, state.recent)

        try:
            if state.recent.covers(batch):      # every frame already ran: no load, no run
                (outputs, ran), run_s = run(), 0.0
            else:
                (outputs, ran), timing = self.memory.run(state.key, run)
                run_s = timing.run_s
        except Exception:
            log.exception("model %s failed on a batch of %d", state.key, len(batch))
            for item in batch:
                self._drop(state, item, DropReason.ERROR)
            return
        finished = self.clock()
        with self._cond:
            if ran:
                if state.last_run is not None:     # the first run pays one-time initialisation
                    state.profile.observe(ran, max(run_s, 1e-6))
                state.last_run = finished
                state.batches += 1
                state.frames += ran
                state.batch_sizes.append(ran)
            for item in batch[:len(outputs)]:   # the rest get no output: dropped with `error` below
                within = finished <= item.deadline_mono
                for counts in (state.counts, self._query_counts(item)):
                    if within:
                        counts.within_sla += 1
                    else:
                        counts.late += 1
        deliver(state.key, batch, outputs, finished, lambda item, reason: self._drop(state, item, reason))

    def _drop(self, state: _ModelState, item: WorkItem, reason: DropReason) -> None:
        with self._cond:
            state.counts.dropped[reason.value] += 1
            self._query_counts(item).dropped[reason.value] += 1
        drop_item(item, reason)

    def _query_counts(self, item: WorkItem) -> _SLACounts:
        query = getattr(item.owner, "query_id", "?")
        counts = self._per_query.get(query)
        if counts is None:
            counts = self._per_query[query] = _SLACounts()
        return counts
