"""The model pool: which models are loaded and which executor runs them.

It builds and validates the workload's models (weights loaded, every task fits its model,
merged bundles match the config, each model fits the memory budget) before anything is
replaced, then keeps one ModelWorker per model, or one SwapScheduler for all of them under
`gpu.memory_budget_mb`, in step with the config across reloads, and reports their memory.

Models are built on the host. Without a budget the pool places each on the device; with one
it leaves them on the host and the scheduler's memory manager is the only thing that puts
weights on the device, so a workload larger than the device starts within the budget. Before
an executor starts, each model's precision is chosen and checked (which warms it up).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from edgeva.config import Config, ConfigError, model_key
from edgeva.executor import ModelWorker
from edgeva.gpu import device_report
from edgeva.memory import nvml_device_stats, unique_bytes
from edgeva.merging import BundleError, dense_bytes, load_bundle
from edgeva.merging.bundle import bundle_mismatches
from edgeva import models as zoo     # zoo.build_model looked up per call, so a stand-in can replace it
from edgeva.models.device import resolve_device
from edgeva.models.errors import ModelLoadError, TaskError
from edgeva.models.precision import choose_precision
from edgeva.models.tasks import build_task
from edgeva.scheduler import SwapOptions, SwapScheduler

log = logging.getLogger("edgeva.pool")

PROBE_FRAME = np.full((64, 64, 3), 114, np.uint8)   # a plain grey frame every model must run on


@dataclass(frozen=True)
class PoolPlan:
    """What the pool will hold: every model the config uses (loaded or newly built) and how
    they execute. Built by ModelPool.plan, which has already checked all of it."""

    models: dict[str, Any]                 # model key -> ZooModel
    capacities: dict[str, int]             # model key -> queue room (its queries' `queue` summed)
    max_batch: int
    budget_mb: Optional[float]
    bandwidth_gbps: float
    bundle_path: Optional[str]
    bundle_report: dict[str, Any] = field(default_factory=dict)
    device: torch.device = torch.device("cpu")   # where the models run (they are built on the host)
    precision: str = "auto"
    precision_min_agreement: float = 0.98
    bundle_meta: dict[str, Any] = field(default_factory=dict)   # model key -> ModelMeta of the bundle

    def scheduler_signature(self) -> tuple[Any, ...]:
        return (tuple((k, id(self.models[k])) for k in sorted(self.models)), self.budget_mb, self.max_batch,
                self.bandwidth_gbps, self.precision, self.precision_min_agreement)


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
        self._last_model_stats: Optional[dict[str, Any]] = None   # what the models ran, kept past a stop
        self._stopped = False
        self.bundle_path: Optional[str] = None
        self.bundle_report: dict[str, Any] = {}
        self.bundle_meta: dict[str, Any] = {}
        self.device: Optional[torch.device] = None
        self._precision_checked: dict[str, tuple[Any, ...]] = {}   # key -> (model id, precision, threshold)

    # ------------------------------------------------------------------ plan
    def plan(self, cfg: Config) -> PoolPlan:
        """Load every model the config needs that is not loaded yet, run each on a probe frame,
        and check each task (and the memory budget) fits. Raises ConfigError naming the key;
        changes nothing (a rejected config leaves no trace)."""
        wanted: dict[str, tuple[int, Any]] = {}
        for i, q in enumerate(cfg.queries):
            if q.task.type != "passthrough":
                wanted.setdefault(model_key(q), (i, q))
        staged: dict[str, Any] = {}
        bundle = None
        if wanted and cfg.merging.bundle and cfg.merging.bundle != self.bundle_path:
            bundle = self._read_bundle(cfg)
            for key, meta in bundle.meta.items():   # under the config's keys (the merge's config may differ)
                user = next(q for q in cfg.queries if (q.model, q.weights) == (meta.architecture, meta.weights))
                staged[model_key(user)] = bundle.models[key]
        elif wanted and cfg.merging.bundle:      # the same bundle, maybe changed queries: it must still fit
            _check_bundle(cfg, self.bundle_meta)

        def model_of(key: str) -> Any:
            return staged[key] if key in staged else self.models.get(key)

        for key, (i, q) in wanted.items():
            loaded = model_of(key)
            if loaded is None or (key not in staged and _resized(q, loaded)):
                # not loaded yet, or loaded at another input size: a new model (the running one is untouched)
                where = f"queries[{i}].weights" if q.weights else f"queries[{i}].model"
                try:
                    staged[key] = zoo.build_model(q.model, q.weights, q.download, cfg.gpu.device, place=False)
                except ModelLoadError as exc:
                    raise ConfigError(where, f"query {q.id!r}: {exc}") from None
                if q.input_size is not None:
                    staged[key].input_size = q.input_size
                _probe(staged[key], where, q.id)
        for i, q in enumerate(cfg.queries):
            if q.task.type != "passthrough":
                try:
                    build_task(q.task, model_of(model_key(q)), q.id)
                except TaskError as exc:
                    raise ConfigError(f"queries[{i}].task", str(exc)) from None
        models = {key: model_of(key) for key in wanted}
        if cfg.gpu.memory_budget_mb is not None:
            _check_budget(models, cfg.gpu.memory_budget_mb)
        capacities = {key: sum(q.queue for q in cfg.queries if q.task.type != "passthrough" and model_key(q) == key)
                      for key in wanted}
        return PoolPlan(models, capacities, cfg.gpu.max_batch, cfg.gpu.memory_budget_mb,
                        cfg.gpu.simulated_bandwidth_gbps,
                        cfg.merging.bundle if bundle is not None else self.bundle_path,
                        bundle.report if bundle is not None else self.bundle_report,
                        _device(cfg), cfg.gpu.precision, cfg.gpu.precision_min_agreement,
                        bundle.meta if bundle is not None else self.bundle_meta)

    def replaced_by(self, plan: PoolPlan) -> set[str]:
        """The keys whose port `apply(plan)` will replace (their queries must be rebuilt): a new
        model object (a merged bundle), a switch to or from the budget's scheduler, or a new
        scheduler. Batch size and queue room change in place."""
        if not plan.models:
            return set()
        if plan.budget_mb is not None:
            if self.scheduler is not None and plan.scheduler_signature() == self._budget_signature:
                return set()
            return set(plan.models)
        return {key for key, model in plan.models.items()
                if key not in self.workers or self.workers[key].model is not model}

    # ------------------------------------------------------------------ apply
    def apply(self, plan: PoolPlan) -> set[str]:
        """Make the pool what the plan says: start what is new, stop what is no longer used.
        Returns `replaced_by(plan)` as it was before applying."""
        replaced = self.replaced_by(plan)
        self.device = plan.device
        if plan.device.type == "cuda":
            torch.backends.cudnn.benchmark = True    # fixed input shapes per camera: autotune once
        for key in [k for k in self.models if k not in plan.models]:
            self.models.pop(key)
            self._precision_checked.pop(key, None)
            worker = self.workers.pop(key, None)
            if worker is not None:
                worker.stop()
        self.models.update(plan.models)
        self.bundle_path, self.bundle_report, self.bundle_meta = plan.bundle_path, plan.bundle_report, plan.bundle_meta
        if not plan.models:
            self._stop_scheduler()
        elif plan.budget_mb is not None:
            self._apply_scheduler(plan, replaced)
        else:
            self._stop_scheduler()
            self._apply_workers(plan)
        return replaced

    def sync(self, cfg: Config) -> set[str]:
        """plan(cfg), then apply it."""
        return self.apply(self.plan(cfg))

    def _apply_workers(self, plan: PoolPlan) -> None:
        for key, model in plan.models.items():
            worker = self.workers.get(key)
            if worker is not None and worker.model is not model:
                self.workers.pop(key).stop()   # a new (merged) model: a fresh worker
                worker = None
            if worker is None and callable(getattr(model, "place", None)):      # torch zoo models
                model.place()
            self._check_precision(plan, key, model, lambda fn: fn())     # new model or new precision setting
            if worker is None:
                worker = ModelWorker(key, model, max_batch=plan.max_batch, capacity=plan.capacities[key])
                worker.start()
                self.workers[key] = worker
            else:
                worker.reconfigure(max_batch=plan.max_batch, capacity=plan.capacities[key])

    def _read_bundle(self, cfg: Config) -> Any:
        """A merged bundle's models: shared layers are the same tensors in every model using them."""
        try:
            bundle = load_bundle(cfg.merging.bundle, device="cpu")    # placed (or budgeted) like any model
        except (BundleError, OSError, RuntimeError, KeyError, TypeError) as exc:
            raise ConfigError("merging.bundle", f"cannot load {cfg.merging.bundle}: {exc}") from None
        _check_bundle(cfg, bundle.meta)
        for model in bundle.models.values():
            model.device = _device(cfg)
        return bundle

    def _apply_scheduler(self, plan: PoolPlan, replaced: set[str]) -> None:
        if not replaced:
            return
        for worker in self.workers.values():
            worker.stop()
        self.workers.clear()
        self._stop_scheduler()
        options = SwapOptions(max_batch=plan.max_batch, bandwidth_bytes_per_s=plan.bandwidth_gbps * 1e9,
                              capacity=max(plan.capacities.values()), simulate_copies=True)
        for model in plan.models.values():   # placed by an earlier configuration without a budget: back to the host
            if callable(getattr(model, "to_host", None)):
                model.to_host().prepare_layout()
        # plan() checked each model is a torch module within the budget: the scheduler accepts them.
        self.scheduler = SwapScheduler({k: plan.models[k] for k in sorted(plan.models)},
                                       int(plan.budget_mb * 2**20), device=plan.device, options=options)
        for key in sorted(plan.models):     # also the learning run of each model's load order
            self._check_precision(plan, key, plan.models[key], self.scheduler.port(key).call, force=True)
        self.scheduler.start()
        self._budget_signature = plan.scheduler_signature()

    def _check_precision(self, plan: PoolPlan, key: str, model: Any, run: Any, force: bool = False) -> None:
        signature = (id(model), plan.precision, plan.precision_min_agreement)
        if not force and self._precision_checked.get(key) == signature:
            return
        try:
            choose_precision(model, plan.precision, plan.precision_min_agreement, run=run)
        except Exception:      # a model that cannot run calibration frames fails its batches visibly later
            log.exception("model %s: the precision check and warm-up failed; it runs in float32", key)
            model.autocast_dtype = None
        self._precision_checked[key] = signature

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
        if self._stopped and self._last_model_stats is not None:
            return self._last_model_stats
        scheduler = self.scheduler
        if scheduler is not None:
            out = {k: scheduler.port(k).stats() for k in list(self.models)}
        else:
            out = {k: w.stats() for k, w in list(self.workers.items())}
        for key, section in out.items():
            model = self.models.get(key)
            precision = getattr(model, "precision", None)
            section["device"] = str(getattr(model, "device", "?"))
            section["precision"] = precision.as_dict() if precision is not None else None
        return out

    def device_stats(self) -> dict[str, Any]:
        """The `device` section of `edgeva stats`: the device and, on CUDA, NVML's figures."""
        return device_report(self.device or "cpu")

    def memory_stats(self) -> dict[str, Any]:
        if self.scheduler is not None:
            return self.scheduler.stats()
        if self._stopped and self._last_memory_stats is not None:
            return self._last_memory_stats
        if not self.models:
            return {"budget_bytes": None, "resident_bytes": 0}
        modules = [m.module for m in self.models.values() if getattr(m, "module", None) is not None]
        resident = unique_bytes(modules)
        unshared = sum(dense_bytes(m) for m in modules)   # each model alone: what it would hold unmerged
        stats: dict[str, Any] = {"budget_bytes": None, "merged_bundle": self.bundle_path, "resident_bytes": resident,
                                 "unshared_bytes": unshared, "bytes_saved_by_sharing": unshared - resident,
                                 "saved_fraction": round((unshared - resident) / unshared, 4) if unshared else 0.0}
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
        self._last_model_stats = self.stats()   # a batch run's summary reports what the models ran
        self.workers.clear()
        self._stop_scheduler()
        self._stopped = True


def _probe(model: Any, where: str, query_id: str) -> None:
    """Weights that load but cannot run (a garbage or truncated export is read lazily) fail here,
    at start-up or reload, instead of dropping every frame with `error` afterwards. A torch
    model built on the host runs its probe there (nothing goes to the device before the pool
    places it or the memory manager loads it)."""
    device = getattr(model, "device", None)
    on_host = callable(getattr(model, "to_host", None))
    if on_host:
        model.device = torch.device("cpu")
    try:
        outputs = model.predict([PROBE_FRAME])
    except Exception as exc:
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ConfigError(where, f"query {query_id!r}: the model cannot run a frame "
                                 f"({type(exc).__name__}: {first_line})") from None
    finally:
        if on_host:
            model.device = device
    if len(outputs) != 1:
        raise ConfigError(where, f"query {query_id!r}: the model returned {len(outputs)} outputs for one frame")


def _resized(q: Any, loaded: Any) -> bool:
    """The query asks for another input size than the loaded model runs at: its own, else what a
    fresh build of a torch model has (an export keeps the size it was exported at; a model
    without a size has nothing to change)."""
    have = getattr(loaded, "input_size", None)
    if have is None:
        return False
    if q.input_size is not None:
        return have != q.input_size
    return bool(getattr(loaded, "is_torch", False)) and have != zoo.default_input_size(q.model)


def _check_bundle(cfg: Config, meta: dict[str, Any]) -> None:
    problems = bundle_mismatches(meta, cfg.queries)
    if problems:
        raise ConfigError("merging.bundle", f"{cfg.merging.bundle} does not match the config: " + "; ".join(problems))


def _check_budget(models: dict[str, Any], budget_mb: float) -> None:
    budget = int(budget_mb * 2**20)
    for key, model in models.items():
        module = getattr(model, "module", None)
        if module is None:
            raise ConfigError("gpu.memory_budget_mb", f"model {key} is not a torch module: a memory "
                                                      f"budget needs models it can swap layer by layer")
        size = unique_bytes([module])
        if size > budget:
            raise ConfigError("gpu.memory_budget_mb", f"model {key} needs {size / 2**20:.1f} MiB of "
                                                      f"weights, more than the whole budget of {budget_mb:g} MiB")


def _device(cfg: Config) -> torch.device:
    return resolve_device(cfg.gpu.device)

