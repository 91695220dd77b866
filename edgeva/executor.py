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
from typing import Any, Optional, Protocol

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

    PROBE_S = 2.0

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
        self._last_run_mono = time.monotonic()
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
            _drop(item, DropReason.SHUTDOWN)

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
            # A stale profile (one slow batch, then nothing ran) must not condemn every frame:
            # after PROBE_S without a run, items predicted late run anyway and refresh it.
            trust_prediction = now - self._last_run_mono < self.PROBE_S
            while self._queue and len(batch) < self.max_batch:
                item = self._queue[0]
                already_late = now > item.deadline_mono
                predicted_late = now + self.profile.predict(1) > item.deadline_mono
                if already_late or (predicted_late and trust_prediction):
                    late.append(self._queue.popleft())
                    continue
                oldest_deadline = min([i.deadline_mono for i in batch] + [item.deadline_mono])
                if batch and now + self.profile.predict(len(batch) + 1) > oldest_deadline:
                    break
                batch.append(self._queue.popleft())
        for item in late:
            _drop(item, DropReason.DEADLINE)
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
                    _drop(item, DropReason.ERROR)
                continue
            finished = time.monotonic()
            self._last_run_mono = finished
            if self.batches:   # the first call pays one-time set-up (allocator, kernels): not a profile sample
                self.profile.observe(len(batch), finished - started)
            self.batches += 1
            self.frames += len(batch)
            self.busy_s += finished - started
            self.batch_sizes.append(len(batch))
            if len(outputs) != len(batch):
                log.error("model %s returned %d outputs for %d frames", self.key, len(outputs), len(batch))
            for i, item in enumerate(batch):
                if i >= len(outputs):
                    _drop(item, DropReason.ERROR)
                    continue
                try:
                    item.owner.complete(item, outputs[i], finished)
                except Exception:  # the owner buckets its own failures; a second callback would double-count
                    log.exception("query %s failed on its result", item.owner.query_id)


def _drop(item: WorkItem, reason: DropReason) -> None:
    """The owner's drop callback, which must not take the worker thread down with it."""
    try:
        item.owner.dropped(item, reason)
    except Exception:
        log.exception("query %s failed while dropping a frame", item.owner.query_id)


class ModelPool:
    """The workload's loaded models and how they execute.

    Without a memory budget each distinct (model, weights) gets its own ModelWorker. With
    `gpu.memory_budget_mb` they all time-share one SwapScheduler whose memory manager keeps
    resident weights under the budget. Either way a query holds a `port(key)` with the same
    `submit(item, wait_s)` surface.
    """

    def __init__(self) -> None:
        self.models: dict[str, Any] = {}      # key -> ZooModel, kept across reloads
        self.workers: dict[str, ModelWorker] = {}
        self.scheduler: Any = None             # SwapScheduler when a budget is set
        self._budget_signature: Any = None
        self._last_memory_stats: Optional[dict[str, Any]] = None
        self._stopped = False
        self.bundle_path: Optional[str] = None
        self.bundle_report: dict[str, Any] = {}
        self.bundle_meta: dict[str, Any] = {}

    def sync(self, cfg: Any) -> set[str]:
        """Build what the config needs and stop what it no longer uses. Returns the keys whose
        executor was replaced (their queries must be rebuilt). Raises ConfigError on a bad model
        before stopping anything."""
        wanted = {}
        for i, q in enumerate(cfg.queries):
            if q.task.type != "passthrough":
                wanted.setdefault(model_key(q), (i, q))
        if wanted:
            self.build(cfg, wanted)
        for key in [k for k in self.models if k not in wanted]:
            self.models.pop(key)
            worker = self.workers.pop(key, None)
            if worker is not None:
                worker.stop()
        if not wanted:
            self._stop_scheduler()
            return set()
        if cfg.gpu.memory_budget_mb is not None:
            return self._sync_scheduler(cfg, set(wanted))
        self._stop_scheduler()
        replaced = set()
        for key in wanted:
            capacity = sum(x.queue for x in cfg.queries if model_key(x) == key)
            worker = self.workers.get(key)
            if worker is not None and ((worker.max_batch, worker.capacity) != (cfg.gpu.max_batch, capacity)
                                       or worker.model is not self.models[key]):
                self.workers.pop(key).stop()   # new batch size, queue room or (merged) model: a fresh worker
            if key not in self.workers:
                worker = ModelWorker(key, self.models[key], max_batch=cfg.gpu.max_batch, capacity=capacity)
                worker.start()
                self.workers[key] = worker
                replaced.add(key)
        return replaced

    def build(self, cfg: Any, wanted: dict[str, Any]) -> None:
        """Load every model not loaded yet and check each task (and the budget) fits; nothing is
        stopped, and nothing is kept unless every check passes (a rejected reload leaves no trace)."""
        from edgeva.config import ConfigError
        from edgeva.models import build_model
        from edgeva.models.errors import ModelLoadError, TaskError
        from edgeva.models.tasks import build_task

        staged: dict[str, Any] = {}
        bundle = None
        if cfg.merging.bundle and cfg.merging.bundle != self.bundle_path:
            bundle = self._read_bundle(cfg, set(wanted))
            for key, meta in bundle.meta.items():   # under the config's keys (the merge's config may differ)
                user = next(q for q in cfg.queries if (q.model, q.weights) == (meta.architecture, meta.weights))
                staged[model_key(user)] = bundle.models[key]
        elif cfg.merging.bundle:      # same bundle, maybe changed queries: it must still fit them
            self._check_bundle(cfg, self.bundle_meta)

        def model_of(key: str) -> Any:
            return staged[key] if key in staged else self.models.get(key)

        for key, (i, q) in wanted.items():
            if model_of(key) is None:
                try:
                    staged[key] = build_model(q.model, q.weights, q.download, cfg.gpu.device)
                except ModelLoadError as exc:
                    raise ConfigError(f"queries[{i}].weights" if q.weights else f"queries[{i}].model",
                                      f"query {q.id!r}: {exc}") from None
                if q.input_size is not None:
                    staged[key].input_size = q.input_size
        for i, q in enumerate(cfg.queries):
            if q.task.type != "passthrough":
                try:
                    build_task(q.task, model_of(model_key(q)), q.id)
                except TaskError as exc:
                    raise ConfigError(f"queries[{i}].task", str(exc)) from None
        if cfg.gpu.memory_budget_mb is not None:
            from edgeva.memory import unique_bytes

            budget = int(cfg.gpu.memory_budget_mb * 2**20)
            for key in wanted:
                module = getattr(model_of(key), "module", None)
                if module is None:
                    raise ConfigError("gpu.memory_budget_mb", f"model {key} is not a torch module: a memory "
                                                              f"budget needs models it can swap layer by layer")
                size = unique_bytes([module])
                if size > budget:
                    raise ConfigError("gpu.memory_budget_mb", f"model {key} needs {size / 2**20:.1f} MiB of "
                                                              f"weights, more than the whole budget of "
                                                              f"{cfg.gpu.memory_budget_mb:g} MiB")
        self.models.update(staged)
        if bundle is not None:
            self.bundle_path = cfg.merging.bundle
            self.bundle_report = bundle.report
            self.bundle_meta = bundle.meta

    def _read_bundle(self, cfg: Any, keys: set[str]) -> Any:
        """A merged bundle's models: shared layers are the same tensors in every model using them."""
        from edgeva.config import ConfigError
        from edgeva.merging import BundleError, load_bundle

        try:
            bundle = load_bundle(cfg.merging.bundle, device=str(_device(cfg)))
        except (BundleError, OSError, RuntimeError, KeyError) as exc:
            raise ConfigError("merging.bundle", f"cannot load {cfg.merging.bundle}: {exc}") from None
        self._check_bundle(cfg, bundle.meta)
        return bundle

    @staticmethod
    def _check_bundle(cfg: Any, meta: dict[str, Any]) -> None:
        from edgeva.config import ConfigError
        from edgeva.merging.bundle import bundle_mismatches

        problems = bundle_mismatches(meta, cfg.queries)
        if problems:
            raise ConfigError("merging.bundle", f"{cfg.merging.bundle} does not match the config: "
                                                + "; ".join(problems))

    def _sync_scheduler(self, cfg: Any, keys: set[str]) -> set[str]:
        from edgeva.config import ConfigError
        from edgeva.memory import ModelTooLargeError
        from edgeva.scheduler import SwapOptions, SwapScheduler

        signature = (tuple((k, id(self.models[k])) for k in sorted(keys)), cfg.gpu.memory_budget_mb,
                     cfg.gpu.max_batch, cfg.gpu.simulated_bandwidth_gbps)
        if self.scheduler is not None and signature == self._budget_signature:
            return set()
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()
        self._stop_scheduler()
        options = SwapOptions(max_batch=cfg.gpu.max_batch,
                              bandwidth_bytes_per_s=cfg.gpu.simulated_bandwidth_gbps * 1e9,
                              capacity=max(q.queue for q in cfg.queries if model_key(q) in keys))
        try:
            self.scheduler = SwapScheduler({k: self.models[k] for k in sorted(keys)},
                                           int(cfg.gpu.memory_budget_mb * 2**20), options=options)
        except (ModelTooLargeError, ValueError) as exc:
            raise ConfigError("gpu.memory_budget_mb", str(exc)) from None
        self.scheduler.start()
        self._budget_signature = signature
        return set(keys)

    def _stop_scheduler(self) -> None:
        if self.scheduler is not None:
            self.scheduler.stop()
            self._last_memory_stats = self.scheduler.stats()   # for the final stats after a stop
            self.scheduler = None
            self._budget_signature = None

    def port(self, key: str) -> Any:
        return self.scheduler.port(key) if self.scheduler is not None else self.workers[key]

    def alive(self) -> bool:
        """Every execution thread is running (the watchdog stops when one died)."""
        threads = [w._thread for w in list(self.workers.values())]
        if self.scheduler is not None:
            threads.append(self.scheduler._thread)
        return all(t.is_alive() for t in threads)

    def stats(self) -> dict[str, Any]:
        scheduler = self.scheduler
        if scheduler is not None:
            return {k: scheduler.port(k).stats() for k in list(self.models)}
        return {k: w.stats() for k, w in list(self.workers.items())}

    def memory_stats(self) -> dict[str, Any]:
        if self.scheduler is not None:
            return self.scheduler.stats()
        if self._stopped and self._last_memory_stats is not None:
            return self._last_memory_stats
        if not self.models:
            return {"budget_bytes": None, "resident_bytes": 0}
        from edgeva.memory import nvml_device_stats, unique_bytes

        modules = [m.module for m in self.models.values() if getattr(m, "module", None) is not None]
        resident = unique_bytes(modules)
        unshared = sum(unique_bytes([m]) for m in modules)   # each model alone: what it would hold unmerged
        stats: dict[str, Any] = {"budget_bytes": None, "merged_bundle": self.bundle_path, "resident_bytes": resident,
                                 "unshared_bytes": unshared, "bytes_saved_by_sharing": unshared - resident,
                                 "saved_fraction": round((unshared - resident) / unshared, 4) if unshared else 0.0}
        devices = {m.device for m in self.models.values() if getattr(m, "device", None) is not None}
        for device in devices:
            if getattr(device, "type", None) == "cuda":
                import torch

                index = device.index or 0
                stats[f"cuda:{index}"] = {"allocated_bytes": torch.cuda.memory_allocated(index),
                                          "reserved_bytes": torch.cuda.memory_reserved(index),
                                          **nvml_device_stats(index)}
        return stats

    def stop(self) -> None:
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()
        self._stop_scheduler()
        self._stopped = True


def _device(cfg: Any) -> Any:
    from edgeva.models.device import resolve_device

    return resolve_device(cfg.gpu.device)


def model_key(q: Any) -> str:
    """Queries with the same model, weights and input size share one loaded model."""
    size = getattr(q, "input_size", None)
    return f"{q.model}@{q.weights or 'init'}" + (f"@{size}px" if size else "")
