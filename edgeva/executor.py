"""Model execution: one worker thread per loaded model, batching frames of every query
(and so every camera) that uses it, under each frame's SLA deadline.

Batch size follows a per-model latency profile (fixed cost + per-frame cost, fitted
online): a batch grows only while the oldest frame in it can still finish before its
deadline; frames whose deadline has already passed, or cannot be met even alone, are
dropped with reason `deadline` instead of delaying everything behind them.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from edgeva.messages import DropReason, Frame

log = logging.getLogger("edgeva.executor")


class Predictor(Protocol):
    name: str

    def predict(self, images: list[Any]) -> list[Any]: ...


class WorkOwner(Protocol):
    """The query runtime that queued an item gets it back exactly once: done or dropped."""

    query_id: str

    def complete(self, item: "WorkItem", output: Any, finished_mono: float) -> None: ...

    def dropped(self, item: "WorkItem", reason: DropReason) -> None: ...


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


class ModelWorker:
    """Runs one model on batches drawn from its queue; owns no query state."""

    def __init__(self, key: str, model: Predictor, max_batch: int = 8, capacity: int = 64,
                 batch_linger_s: float = 0.004):
        self.key = key
        self.model = model
        self.max_batch = max_batch
        self.capacity = capacity
        self.batch_linger_s = batch_linger_s
        self.profile = LatencyProfile()
        self.batches = 0
        self.frames = 0
        self.busy_s = 0.0
        self.batch_sizes: deque[int] = deque(maxlen=200)
        self._queue: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"model-{key}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, item: WorkItem, wait_s: float = 0.0) -> bool:
        """Queue an item, waiting up to `wait_s` for room; False when the queue stayed full
        (the caller drops with `queue-full`) or the worker is stopping."""
        give_up = time.monotonic() + wait_s
        with self._cond:
            while not self._stop and len(self._queue) >= self.capacity:
                remaining = give_up - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(timeout=min(remaining, 0.2))
            if self._stop:
                return False
            self._queue.append(item)
            self._cond.notify_all()
            return True

    def stop(self, timeout_s: float = 4.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)
        with self._cond:
            left, self._queue = list(self._queue), deque()
        for item in left:
            item.owner.dropped(item, DropReason.SHUTDOWN)

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def stats(self) -> dict[str, Any]:
        sizes = list(self.batch_sizes)
        return {"queued": self.pending(), "batches": self.batches, "frames": self.frames,
                "busy_s": round(self.busy_s, 3),
                "mean_batch": round(sum(sizes) / len(sizes), 2) if sizes else None,
                "per_frame_ms": None if self.profile.per_item_s is None else round(self.profile.per_item_s * 1e3, 2),
                "fixed_ms": round(self.profile.fixed_s * 1e3, 2)}

    def _take_batch(self) -> list[WorkItem]:
        with self._cond:
            while not self._queue and not self._stop:
                self._cond.wait(timeout=0.5)
            if self._stop:
                return []
            linger_until = time.monotonic() + self.batch_linger_s
            while len(self._queue) < self.max_batch and not self._stop:
                remaining = linger_until - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(timeout=remaining)
            batch: list[WorkItem] = []
            late: list[WorkItem] = []
            self._cond.notify_all()   # room in the queue for blocked submitters
            now = time.monotonic()
            while self._queue and len(batch) < self.max_batch:
                item = self._queue[0]
                if now + self.profile.predict(1) > item.deadline_mono:
                    late.append(self._queue.popleft())
                    continue
                oldest_deadline = min([i.deadline_mono for i in batch] + [item.deadline_mono])
                if batch and now + self.profile.predict(len(batch) + 1) > oldest_deadline:
                    break
                batch.append(self._queue.popleft())
        for item in late:
            item.owner.dropped(item, DropReason.DEADLINE)
        return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if not batch:
                with self._cond:
                    if self._stop:
                        return
                continue
            started = time.monotonic()
            try:
                outputs = self.model.predict([item.frame.image for item in batch])
            except Exception:
                log.exception("model %s failed on a batch of %d", self.key, len(batch))
                for item in batch:
                    item.owner.dropped(item, DropReason.ERROR)
                continue
            finished = time.monotonic()
            self.profile.observe(len(batch), finished - started)
            self.batches += 1
            self.frames += len(batch)
            self.busy_s += finished - started
            self.batch_sizes.append(len(batch))
            for item, output in zip(batch, outputs):
                try:
                    item.owner.complete(item, output, finished)
                except Exception:  # the owner buckets its own failures; a second callback would double-count
                    log.exception("query %s failed on its result", item.owner.query_id)
