"""What the executors share: the work item a query queues, its owner's callbacks, the
latency profile of a model, and deadline batching.

Both executors (a ModelWorker per model, or the SwapScheduler time-sharing models under a
memory budget) form batches with `plan_batch` and hand outputs back with `deliver`, so the
rules (earliest deadline first; drop what cannot be met; every item gets exactly one
callback) live in one place.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from edgeva.messages import DropReason, Frame

log = logging.getLogger("edgeva.work")


class Predictor(Protocol):
    name: str

    def predict(self, images: list[Any]) -> list[Any]: ...


class WorkOwner(Protocol):
    """The query runtime that queued an item gets it back exactly once: done or dropped."""

    query_id: str

    def complete(self, item: "WorkItem", output: Any, finished_mono: float) -> None: ...

    def dropped(self, item: "WorkItem", reason: DropReason) -> None: ...


class ExecutorPort(Protocol):
    """What a query submits to: a ModelWorker, a SwapScheduler's port or an offload port.
    `runs_each_frame_once`: a frame several queries submit (in one batch or a later one) runs
    once (predict_each_frame_once with RecentOutputs), so a query keeping a frame another query
    of the camera already keeps on the same port costs no model run."""

    key: str
    model: Any
    runs_each_frame_once: bool

    def submit(self, item: "WorkItem", wait_s: float = 0.0) -> bool: ...


@dataclass(slots=True)
class WorkItem:
    owner: WorkOwner
    frame: Frame
    deadline_mono: float
    audit: bool = False              # a check of a reused result; never counted as a frame outcome
    context: Any = None              # the owner's own bookkeeping (e.g. reused frames waiting on it)
    enqueued_mono: float = field(default_factory=time.monotonic)


class LatencyProfile:
    """latency(batch) ~ fixed + per_item * n, fitted with exponential moving averages."""

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.per_item_s: float | None = None
        self.fixed_s = 0.0
        self.samples = 0

    def observe(self, batch: int, seconds: float) -> None:
        self.samples += 1
        per = seconds / batch
        if self.per_item_s is None:
            self.per_item_s, self.fixed_s = per, 0.0
            return
        # Single-frame batches reveal fixed + per_item; larger ones the slope.
        predicted = self.predict(batch)
        error = seconds - predicted
        if batch == 1:
            self.fixed_s = max(0.0, self.fixed_s + self.alpha * error)
        else:
            self.per_item_s = max(1e-6, self.per_item_s + self.alpha * error / batch)

    def predict(self, batch: int) -> float:
        if self.per_item_s is None:
            return 0.0
        return self.fixed_s + self.per_item_s * batch


@dataclass(frozen=True)
class BatchPlan:
    batch: list[WorkItem]           # earliest deadline first
    late: list[WorkItem]            # to drop with DropReason.DEADLINE

    @property
    def images(self) -> int:
        """The distinct frames the batch runs: a frame several queries keep runs once."""
        return len({id(item.frame) for item in self.batch})


def plan_batch(queued: Iterable[WorkItem], now: float, max_batch: int, run_s: Callable[[int], float],
               load_s: float = 0.0, trust_prediction: bool = True) -> BatchPlan:
    """The batch to run now, earliest deadline first, and the items that are already late.

    An item is late when its deadline has passed or, when the prediction is trusted, when
    even alone it cannot finish in time (`load_s` + `run_s(1)`). The batch grows while its
    earliest deadline can still be met by the whole batch (`load_s` + `run_s(n)`). A caller
    whose profile may be stale (nothing ran for a while) passes trust_prediction=False so
    items run anyway and refresh it, instead of a single slow batch condemning every frame.
    Size and cost count distinct frames: a frame several queries keep runs once, so `max_batch`
    frames are taken, and every queued item of a frame in the batch rides along (not late).
    """
    alone_s = load_s + run_s(1) if trust_prediction else 0.0
    batch: list[WorkItem] = []
    late: list[WorkItem] = []
    frames: set[int] = set()
    ordered = sorted(queued, key=lambda i: i.deadline_mono)
    for item in ordered:
        if now + alone_s > item.deadline_mono:
            late.append(item)
            continue
        if id(item.frame) not in frames:
            if len(frames) >= max_batch:
                break
            if batch and now + load_s + run_s(len(frames) + 1) > batch[0].deadline_mono:
                break
            frames.add(id(item.frame))
        batch.append(item)
    taken = {id(i) for i in batch} | {id(i) for i in late}
    batch.extend(i for i in ordered if id(i) not in taken and id(i.frame) in frames
                 and now <= i.deadline_mono)
    return BatchPlan(batch, late)


def take(queue: deque[WorkItem], plan: BatchPlan) -> None:
    """Remove the plan's batch and late items from `queue`, keeping the others in order."""
    taken = {id(i) for i in plan.batch} | {id(i) for i in plan.late}
    kept = [i for i in queue if id(i) not in taken]
    queue.clear()
    queue.extend(kept)


class RecentOutputs:
    """One model's outputs on the frames it ran last. A query's item for a frame that another
    query's item already ran in an earlier batch (its decision came later: batch replay waits
    for the results its filter needs, a batch was full, an audit) takes that output instead of
    running the frame again. Keyed by camera, sequence number and capture time (a restarted
    camera numbers from 0 again), so no picture is held."""

    def __init__(self, size: int = 256):
        self.size = size
        self.reused = 0          # items that took an output instead of running their frame again
        self._outputs: OrderedDict[tuple[str, int, float], Any] = OrderedDict()

    @staticmethod
    def _key(frame: Frame) -> tuple[str, int, float]:
        return frame.camera, frame.seq, frame.t_mono

    def get(self, frame: Frame) -> tuple[bool, Any]:
        key = self._key(frame)
        if key not in self._outputs:
            return False, None
        self.reused += 1
        return True, self._outputs[key]

    def has(self, frame: Frame) -> bool:
        """The model ran `frame` lately: an item for it costs no run."""
        return self._key(frame) in self._outputs

    def covers(self, batch: Sequence["WorkItem"]) -> bool:
        return all(self._key(item.frame) in self._outputs for item in batch)

    def put(self, frame: Frame, output: Any) -> None:
        key = self._key(frame)
        self._outputs[key] = output
        self._outputs.move_to_end(key)
        while len(self._outputs) > self.size:
            self._outputs.popitem(last=False)


def costs_a_run(item: WorkItem, queued: Iterable[WorkItem], recent: RecentOutputs) -> bool:
    """Whether queueing `item` adds work: not when its frame is already queued (another query
    of the camera keeps or audits it) or ran lately. A queue's capacity bounds the frames
    waiting for the model, so such an item is always taken."""
    return not recent.has(item.frame) and all(q.frame is not item.frame for q in queued)


def predict_each_frame_once(predict: Callable[[list[Any]], Sequence[Any]], batch: Sequence[WorkItem],
                            recent: RecentOutputs | None = None) -> tuple[list[Any], int]:
    """Run the model once per distinct frame of the batch and give each item its frame's output,
    in order; also returns how many images ran. Queries of one camera receive the same Frame
    object, so a frame that several of them keep (or audit) on one model is inferred once; with
    `recent`, also when their items come in different batches. A model returning too few
    outputs yields a short list: `deliver` drops the items past it."""
    slot: dict[int, int] = {}        # id(frame) -> its place among `images`
    ran_before: dict[int, Any] = {}  # id(frame) -> its output from an earlier batch
    images: list[Any] = []
    frames: list[Frame] = []
    for item in batch:
        key = id(item.frame)
        known, output = recent.get(item.frame) if recent is not None else (False, None)
        if known:
            ran_before[key] = output
        elif key not in slot:
            slot[key] = len(images)
            images.append(item.frame.image)
            frames.append(item.frame)
    distinct = list(predict(images)) if images else []
    if recent is not None:
        for frame, output in zip(frames, distinct):
            recent.put(frame, output)
    outputs: list[Any] = []
    for item in batch:
        key = id(item.frame)
        if key in ran_before:
            outputs.append(ran_before[key])
            continue
        if slot[key] >= len(distinct):
            break
        outputs.append(distinct[slot[key]])
    return outputs, len(images)


def deliver(model_key: str, batch: Sequence[WorkItem], outputs: Sequence[Any], finished_mono: float,
            drop: Callable[[WorkItem, DropReason], None]) -> list[WorkItem]:
    """Hand each item its output; an item the model returned no output for is dropped with
    `error` through `drop` (never left without a callback). Returns the completed items."""
    if len(outputs) != len(batch):
        log.error("model %s returned %d outputs for %d frames", model_key, len(outputs), len(batch))
    completed = list(batch[:len(outputs)])
    for item, output in zip(completed, outputs):
        try:
            item.owner.complete(item, output, finished_mono)
        except Exception:  # the owner got its one callback; its failure is its own
            log.exception("query %s failed on its result", getattr(item.owner, "query_id", "?"))
    for item in batch[len(outputs):]:
        drop(item, DropReason.ERROR)
    return completed


def drop_item(item: WorkItem, reason: DropReason) -> None:
    """The owner's drop callback, which must not take the executor thread down with it."""
    try:
        item.owner.dropped(item, reason)
    except Exception:
        log.exception("query %s failed while dropping a frame", getattr(item.owner, "query_id", "?"))
