"""The model pool: which models are loaded and which executor runs them.

It builds and validates the workload's models (weights loaded, every task fits its model,
merged bundles match the config, each model fits the memory budget) before anything is
replaced, then keeps one ModelWorker per model, or one SwapScheduler for all of them under
`gpu.memory_budget_mb`, in step with the config across reloads, and reports their memory.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

import torch

from edgeva.config import Config, ConfigError, model_key
from edgeva.executor import ModelWorker
from edgeva.memory import ModelTooLargeError, nvml_device_stats, unique_bytes
from edgeva.merging import BundleError, load_bundle
from edgeva import models as zoo     # zoo.build_model looked up per call, so a stand-in can replace it
from edgeva.models.device import resolve_device
from edgeva.models.errors import ModelLoadError, TaskError
from edgeva.models.tasks import build_task
from edgeva.scheduler import SwapOptions, SwapScheduler

log = logging.getLogger("edgeva.pool")


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
        self.scheduler: Optional[SwapScheduler] = None   # when a budget is set
        self._budget_signature: Any = None
        self._last_memory_stats: Optional[dict[str, Any]] = None
        self._stopped = False
        self.bundle_path: Optional[str] = None
        self.bundle_report: dict[str, Any] = {}

    def sync(self, cfg: Config) -> set[str]:
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

    def build(self, cfg: Config, wanted: dict[str, Any]) -> None:
        """Load every model not loaded yet and check each task (and the budget) fits; nothing is
        stopped, and nothing is kept unless every check passes (a rejected reload leaves no trace)."""
        staged: dict[str, Any] = {}
        bundle = None
        if cfg.merging.bundle and cfg.merging.bundle != self.bundle_path:
            bundle = self._read_bundle(cfg, set(wanted))
            staged.update(bundle.models)

        def model_of(key: str) -> Any:
            return staged[key] if key in staged else self.models.get(key)

        for key, (i, q) in wanted.items():
            if model_of(key) is None:
                try:
                    staged[key] = zoo.build_model(q.model, q.weights, q.download, cfg.gpu.device)
                except ModelLoadError as exc:
                    raise ConfigError(f"queries[{i}].weights" if q.weights else f"queries[{i}].model",
                                      f"query {q.id!r}: {exc}") from None
        for i, q in enumerate(cfg.queries):
            if q.task.type != "passthrough":
                try:
                    build_task(q.task, model_of(model_key(q)), q.id)
                except TaskError as exc:
                    raise ConfigError(f"queries[{i}].task", str(exc)) from None
        if cfg.gpu.memory_budget_mb is not None:
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

    def _read_bundle(self, cfg: Config, keys: set[str]) -> Any:
        """A merged bundle's models: shared layers are the same tensors in every model using them."""
        try:
            bundle = load_bundle(cfg.merging.bundle, device=str(_device(cfg)))
        except (BundleError, OSError, RuntimeError, KeyError) as exc:
            raise ConfigError("merging.bundle", f"cannot load {cfg.merging.bundle}: {exc}") from None
        unused = sorted(set(bundle.models) - keys)
        if unused:
            raise ConfigError("merging.bundle", f"the bundle has models no query uses: {', '.join(unused)} "
                                                f"(merged for another config?)")
        return bundle

    def _sync_scheduler(self, cfg: Config, keys: set[str]) -> set[str]:
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
        scheduler = self.scheduler
        return all(w.alive() for w in list(self.workers.values())) and (scheduler is None or scheduler.alive())

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
        stats: dict[str, Any] = {"budget_bytes": None, "merged_bundle": self.bundle_path,
                                 "resident_bytes": unique_bytes([m.module for m in self.models.values()
                                                                 if getattr(m, "module", None) is not None])}
        devices = {m.device for m in self.models.values() if getattr(m, "device", None) is not None}
        for device in devices:
            if getattr(device, "type", None) == "cuda":
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


def _device(cfg: Config) -> torch.device:
    return resolve_device(cfg.gpu.device)

