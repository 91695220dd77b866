"""Batched execution: one worker thread per loaded model, batching frames of every query
(and so every camera) that uses it, under each frame's SLA deadline.

Batch size follows a per-model latency profile (fixed cost + per-frame cost, fitted
online): a batch grows only while the earliest deadline in it can still be met; frames
whose deadline has already passed, or cannot be met even alone, are dropped with reason
`deadline` instead of delaying everything behind them (`edgeva.work.plan_batch`, shared
with the swap scheduler). Which workers exist is the model pool's business (`edgeva.pool`).
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any, Callable, TypeVar

from edgeva.messages import DropReason
from edgeva.work import (
    LatencyProfile, Predictor, RecentOutputs, WorkItem, costs_a_run, deliver,
    drop_item, plan_batch, predict_each_frame_once, take,
)

log = logging.getLogger("edgeva.executor")
T = TypeVar("T")


class ModelWorker:
    """Runs one model on batches drawn from its queue; owns no query state."""

    PROBE_S = 2.0
    runs_each_frame_once = True        # predict_each_frame_once with RecentOutputs

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
        self.recent = RecentOutputs()      # a frame kept again after its batch ran is not run again
        self._last_run_mono = time.monotonic()
        self._queue: deque[WorkItem] = deque()
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"model-{key}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def reconfigure(self, max_batch: int, capacity: int) -> None:
        """New batch size and queue room, applied to the next batch (no restart, nothing dropped)."""
        with self._cond:
            self.max_batch, self.capacity = max_batch, capacity
            self._cond.notify_all()

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` with this model (e.g. a split head): its weights stay on the device."""
        return fn()

    def submit(self, item: WorkItem, wait_s: float = 0.0) -> bool:
        """Queue an item, waiting up to `wait_s` for room; False when the queue stayed full
        (the caller drops with `queue-full`) or the worker is stopping."""
        give_up = time.monotonic() + wait_s
        with self._cond:
            while (not self._stop and len(self._queue) >= self.capacity
                   and costs_a_run(item, self._queue, self.recent)):
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
            drop_item(item, DropReason.SHUTDOWN)

    def pending(self) -> int:
        with self._cond:
            return len(self._queue)

    def stats(self) -> dict[str, Any]:
        sizes = list(self.batch_sizes)
        return {"queued": self.pending(), "batches": self.batches, "frames": self.frames,
                "outputs_reused": self.recent.reused,
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
            self._cond.notify_all()   # room in the queue for blocked submitters
            now = time.monotonic()
            # A stale profile (one slow batch, then nothing ran) must not condemn every frame:
            # after PROBE_S without a run, items predicted late run anyway and refresh it.
            plan = plan_batch(self._queue, now, self.max_batch, self.profile.predict,
                              trust_prediction=now - self._last_run_mono < self.PROBE_S)
            take(self._queue, plan)
        for item in plan.late:
            drop_item(item, DropReason.DEADLINE)
        return plan.batch

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
                outputs, ran = predict_each_frame_once(self.model.predict, batch, self.recent)
            except Exception:
                log.exception("model %s failed on a batch of %d", self.key, len(batch))
                for item in batch:
                    drop_item(item, DropReason.ERROR)
                continue
            finished = time.monotonic()
            if ran:         # else every frame had already run: the model did nothing
                self._last_run_mono = finished
                if self.batches:   # the first call pays one-time set-up (allocator, kernels): not a profile sample
                    self.profile.observe(ran, finished - started)
                self.batches += 1
                self.frames += ran
                self.busy_s += finished - started
                self.batch_sizes.append(ran)
            deliver(self.key, batch, outputs, finished, drop_item)
