"""The device memory budget: which model tensors are resident, layer-granular load/evict,
pinned host copies, and pipelined swap-in (PipeSwitch-style) through forward pre-hooks.

Units:
  * TensorSlot: one unique tensor storage. A parameter shared by several models (merging
    makes modules hold the same nn.Parameter) is one slot, so it is counted and moved once.
    Residency, budget accounting and eviction work on slots.
  * Block: the tensors owned directly by one module (parameters and buffers, recurse=False),
    in execution order. A forward pre-hook on the module waits until its block is loaded,
    so any nn.Module runs block by block unchanged while later blocks are still in transit.

This module is the policy: what is resident, what to evict, in which order to load and when
execution must wait. How bytes move is a `TransferBackend` (`transfer.py`): real copies on
CUDA (pinned host copies, a side stream, events), simulated on the CPU, so every policy
behaviour is tested without a device.

The manager is the only thing that puts a registered model's weights on the device: register
models built on the host, and `close()` hands every tensor back as a plain host tensor.
Registered modules run only inside `run` (a forward pre-hook refuses any other use).

One module of ~700 lines: residency, eviction, load planning and the pipelined run share one
lock and one set of slot states, and splitting them would spread that invariant over files.
"""
from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, TypeVar

import torch
from torch import nn

from edgeva.gpu import nvml_device_stats  # noqa: F401  (re-exported: callers import it from here)
from edgeva.transfer import SlotState, TensorOwner, TensorSlot, TransferBackend, make_backend

log = logging.getLogger("edgeva.memory")

T = TypeVar("T")
DEFAULT_BANDWIDTH_BYTES_PER_S = 12e9     # pinned PCIe Gen3 x16 (CUDA best-practices guide)
DEFAULT_GROUP_MIN_BYTES = 1 << 20        # loads are issued in groups of >= 1 MiB of blocks
_WAIT_POLL_S = 0.5


class ModelTooLargeError(ValueError):
    """A model's weights alone exceed the whole memory budget: it could never be resident."""


class BudgetExceededError(RuntimeError):
    """Resident bytes went over the budget: a bug in the manager, never expected."""


class OutsideRunError(RuntimeError):
    """A registered model's module ran outside `MemoryManager.run`: its weights may be on the
    host or being rebound by an eviction (on CUDA: a device mismatch or a read of freed memory)."""


class Granularity(str, enum.Enum):
    BLOCK = "block"      # evict single tensors (layers) by policy
    MODEL = "model"      # evict whole models (the classic time-sharing baseline)


class EvictionPolicy(str, enum.Enum):
    BELADY = "belady"    # farthest next use in the upcoming schedule
    LRU = "lru"


@dataclass(eq=False)
class Block:
    model_key: str
    index: int
    module_name: str
    module: nn.Module
    slots: tuple[TensorSlot, ...]

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)


@dataclass(eq=False)
class ModelLayout:
    key: str
    root: nn.Module
    blocks: list[Block]
    load_order: list[int]                       # block indices, learned from the first run
    wait_at_root: set[int] = field(default_factory=set)   # blocks whose module never ran itself
    learned: bool = False
    runs: int = 0
    loads: int = 0
    bytes_loaded: int = 0

    @property
    def slots(self) -> list[TensorSlot]:
        seen: dict[int, TensorSlot] = {}
        for b in self.blocks:
            for s in b.slots:
                seen.setdefault(id(s), s)
        return list(seen.values())

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.slots)


@dataclass(frozen=True)
class MemoryEvent:
    """One load group, eviction or run, for timelines and invariant checks."""

    kind: str               # load | evict | run
    model_key: str
    start: float
    end: float
    nbytes: int
    resident_bytes: int


@dataclass(frozen=True)
class RunTiming:
    load_s: float           # time the transfers took (loader busy time)
    run_s: float            # execution time, not counting waits for loads
    stall_s: float          # time execution waited for loads
    hidden_s: float         # load time overlapped with execution
    wall_s: float
    bytes_loaded: int


@dataclass
class _LoadJob:
    model_key: str
    groups: list[list[tuple[Block, list[TensorSlot]]]]
    done: threading.Event = field(default_factory=threading.Event)
    error: Optional[BaseException] = None
    busy_s: float = 0.0
    started: Optional[float] = None
    ended: Optional[float] = None
    sent_bytes: int = 0
    cuda_start: Any = None       # set by the CUDA backend
    cuda_end: Any = None

    def slots(self) -> list[TensorSlot]:
        return [s for g in self.groups for _, slots in g for s in slots]


@dataclass
class _ActiveRun:
    thread_id: int
    layout: ModelLayout
    job: Optional[_LoadJob]
    block_by_module: dict[int, Block]
    fired: list[int] = field(default_factory=list)
    waited: set[int] = field(default_factory=set)    # slots made visible to this run's stream
    stall_before_s: float = 0.0     # waiting for the whole load before execution
    stall_inside_s: float = 0.0     # waits in pre-hooks during execution

    @property
    def stall_s(self) -> float:
        return self.stall_before_s + self.stall_inside_s


@dataclass
class _Counters:
    loads: int = 0              # load groups transferred
    evictions: int = 0          # tensors evicted
    bytes_loaded: int = 0
    bytes_evicted: int = 0
    load_s: float = 0.0
    run_s: float = 0.0
    stall_s: float = 0.0
    hidden_s: float = 0.0
    runs: int = 0
    peak_resident_bytes: int = 0


class MemoryManager:
    """Keeps registered models' tensors resident within `budget_bytes` and runs them block
    by block while their missing blocks load. Call `run` from one executor thread."""

    def __init__(self, budget_bytes: int, device: torch.device | str = "cpu", *,
                 bandwidth_bytes_per_s: float = DEFAULT_BANDWIDTH_BYTES_PER_S,
                 simulate_transfer: bool = True,
                 granularity: Granularity | str = Granularity.BLOCK,
                 eviction: EvictionPolicy | str = EvictionPolicy.BELADY,
                 pipelined: bool = True,
                 group_min_bytes: int = DEFAULT_GROUP_MIN_BYTES,
                 listeners: Sequence[Callable[[MemoryEvent], None]] = (),
                 clock: Callable[[], float] = time.monotonic,
                 simulate_copies: bool = False,
                 backend: Optional[TransferBackend] = None):
        if budget_bytes <= 0:
            raise ValueError(f"memory budget must be positive, got {budget_bytes} bytes")
        self.budget_bytes = int(budget_bytes)
        self.bandwidth_bytes_per_s = float(bandwidth_bytes_per_s)
        self.simulate_transfer = simulate_transfer
        self.backend = backend if backend is not None else make_backend(
            torch.device(device), self.bandwidth_bytes_per_s, simulate_transfer=simulate_transfer,
            simulate_copies=simulate_copies, clock=clock)
        self.device = self.backend.device
        self.granularity = Granularity(granularity)
        self.eviction = EvictionPolicy(eviction)
        self.pipelined = pipelined
        self.group_min_bytes = group_min_bytes
        self.listeners = list(listeners)
        self.clock = clock
        self.resident_bytes = 0
        self.counters = _Counters()
        self._layouts: dict[str, ModelLayout] = {}
        self._slots: list[TensorSlot] = []
        self._slot_by_ptr: dict[int, TensorSlot] = {}      # data_ptr of a slot's host or device copy
        self._hooks: list[Any] = []
        self._hooked_modules: set[int] = set()
        self._upcoming: list[str] = []
        self._model_last_used: dict[str, float] = {}
        self._lock = threading.RLock()
        self._active: Optional[_ActiveRun] = None
        self._jobs: "queue.Queue[Optional[_LoadJob]]" = queue.Queue()
        self._loader: Optional[threading.Thread] = None
        self._run_lock = threading.Lock()
        self._closed = False

    @property
    def on_cuda(self) -> bool:
        return self.backend.name == "cuda"

    # ------------------------------------------------------------------ registration
    def register(self, key: str, module: nn.Module) -> ModelLayout:
        """Split `module` into blocks and account for its tensors (host-resident at first).

        Raises ModelTooLargeError when its unique bytes exceed the whole budget."""
        if key in self._layouts:
            raise ValueError(f"model {key!r} is already registered")
        size = unique_bytes([module])
        if size > self.budget_bytes:
            raise ModelTooLargeError(
                f"model {key!r} needs {_mib(size)} of weights but the GPU memory budget is "
                f"{_mib(self.budget_bytes)}; raise gpu.memory_budget_mb to at least "
                f"{size / 2**20:.1f} or drop the model")
        with self._lock:
            if self._closed:
                raise RuntimeError("the memory manager is closed")
            originals: dict[int, TensorSlot] = {}   # this module's storages as it was built
            blocks: list[Block] = []
            for name, mod in module.named_modules():
                tensors = [(n, t, True) for n, t in mod.named_parameters(recurse=False)]
                tensors += [(n, t, False) for n, t in mod.named_buffers(recurse=False) if t is not None]
                slots: dict[int, TensorSlot] = {}
                for attr, tensor, is_param in tensors:
                    if tensor.numel() == 0:
                        continue
                    slot = self._slot_for(mod, attr, tensor, is_param, originals)
                    slot.users.add((key, len(blocks)))
                    slots.setdefault(id(slot), slot)
                if slots:
                    blocks.append(Block(key, len(blocks), name or "<root>", mod, tuple(slots.values())))
            layout = ModelLayout(key, module, blocks, list(range(len(blocks))))
            self._layouts[key] = layout
            for mod in {id(b.module): b.module for b in blocks}.values():
                self._hook(mod)
            self._hook(module)
            self._model_last_used[key] = 0.0
        log.info("memory: registered %s: %d blocks, %s (%s unique so far of a %s budget)",
                 key, len(blocks), _mib(layout.nbytes), _mib(self.total_registered_bytes()),
                 _mib(self.budget_bytes))
        return layout

    def _slot_for(self, mod: nn.Module, attr: str, tensor: torch.Tensor, is_param: bool,
                  originals: dict[int, TensorSlot]) -> TensorSlot:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        slot = self._slot_by_ptr.get(ptr) or originals.get(ptr)
        if slot is None:
            slot = TensorSlot(ptr, storage.nbytes())
            self.backend.adopt(slot, storage)
            self._slots.append(slot)
            originals[ptr] = slot     # other owners of this storage in the module still point at it
            self._slot_by_ptr[slot.host.data_ptr()] = slot
        owner = TensorOwner(mod, attr, is_param, tensor.dtype, tensor.storage_offset(),
                            tuple(tensor.shape), tuple(tensor.stride()))
        slot.owners.append(owner)
        self.backend.attach(slot, owner)       # on CUDA: the built copy is freed once all are rebound
        return slot

    def _hook(self, mod: nn.Module) -> None:
        if id(mod) not in self._hooked_modules:
            self._hooked_modules.add(id(mod))
            self._hooks.append(mod.register_forward_pre_hook(self._before_module))

    def layout(self, key: str) -> ModelLayout:
        return self._layouts[key]

    def model_keys(self) -> list[str]:
        return list(self._layouts)

    def total_registered_bytes(self) -> int:
        return sum(s.nbytes for s in self._slots)

    # ------------------------------------------------------------------ residency queries
    def missing_bytes(self, key: str) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._layouts[key].slots if s.state is SlotState.HOST)

    def is_resident(self, key: str) -> bool:
        return self.missing_bytes(key) == 0

    def resident_bytes_of(self, key: str) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._layouts[key].slots if s.state is not SlotState.HOST)

    def effective_bandwidth(self) -> float:
        return getattr(self.backend, "measured_bandwidth", None) or self.bandwidth_bytes_per_s

    def predicted_load_s(self, key: str) -> float:
        if self.backend.name == "none":
            return 0.0
        return self.missing_bytes(key) / self.effective_bandwidth()

    def predicted_exposed_load_s(self, key: str, run_s: float) -> float:
        """Load time execution would wait for: all of it without pipelining, else what
        execution cannot hide (at least the first group)."""
        load_s = self.predicted_load_s(key)
        if load_s == 0.0:
            return 0.0
        layout = self._layouts[key]
        if not self.pipelined or not layout.learned:
            return load_s
        first = min(load_s, max(self.group_min_bytes, 1) / self.effective_bandwidth())
        return max(first, load_s - run_s)

    def set_upcoming(self, order: Iterable[str]) -> None:
        """The expected execution order from now on (soonest first), for Belady eviction."""
        with self._lock:
            self._upcoming = [k for k in order if k in self._layouts]

    # ------------------------------------------------------------------ eviction
    def choose_victims(self, needed_bytes: int, target: str) -> list[TensorSlot]:
        """Resident tensors to evict to free `needed_bytes`, never ones `target` uses."""
        with self._lock:
            protected = {id(s) for s in self._layouts[target].slots}
            groups = self._eviction_groups(protected)
            victims: list[TensorSlot] = []
            freed = 0
            for _, group in sorted(groups, key=lambda g: g[0]):
                if freed >= needed_bytes:
                    break
                victims.extend(group)
                freed += sum(s.nbytes for s in group)
            if freed < needed_bytes:
                raise BudgetExceededError(
                    f"cannot free {_mib(needed_bytes)} for {target!r}: only {_mib(freed)} evictable")
            return victims

    def _eviction_groups(self, protected: set[int]) -> list[tuple[tuple, list[TensorSlot]]]:
        """(sort key: evict smallest first, tensors) for every evictable group."""
        evictable = [s for s in self._slots if s.state is SlotState.RESIDENT and id(s) not in protected]
        position = {k: i for i, k in enumerate(self._upcoming)}
        never = len(position) + len(self._layouts)
        if self.granularity is Granularity.MODEL:
            by_model: dict[str, list[TensorSlot]] = {}
            for s in evictable:
                # A shared tensor goes with the model that will need it last.
                owner = max(s.models(), key=lambda m: (position.get(m, never), -self._model_last_used[m]))
                by_model.setdefault(owner, []).append(s)
            if self.eviction is EvictionPolicy.LRU:
                return [((self._model_last_used[m],), g) for m, g in by_model.items()]
            return [((-position.get(m, never), self._model_last_used[m]), g) for m, g in by_model.items()]
        if self.eviction is EvictionPolicy.LRU:
            return [((s.last_used, -s.nbytes), [s]) for s in evictable]
        groups = []
        for s in evictable:
            next_use = min((position.get(m, never), b) for m, b in s.users)
            groups.append(((-next_use[0], -next_use[1], -s.nbytes), [s]))
        return groups

    def _evict(self, victims: list[TensorSlot]) -> None:
        now = self.clock()
        by_model: dict[str, int] = {}
        for s in victims:
            if s.state is not SlotState.RESIDENT:
                continue
            s.state = SlotState.HOST
            s.ready.clear()
            self._unindex_device(s)
            self.backend.evict(s)
            self.resident_bytes -= s.nbytes
            self.counters.evictions += 1
            self.counters.bytes_evicted += s.nbytes
            m = min(s.models())
            by_model[m] = by_model.get(m, 0) + s.nbytes
        for m, nbytes in by_model.items():
            self._emit(MemoryEvent("evict", m, now, now, nbytes, self.resident_bytes))

    # ------------------------------------------------------------------ running
    def run(self, key: str, fn: Callable[[], T]) -> tuple[T, RunTiming]:
        """Make `key` resident (evicting by policy), and call `fn` (which runs the model's
        module) while its missing blocks stream in; block k's forward waits for block k.

        Runs are serialised: another thread (a split model's head) may call it too."""
        with self._run_lock:
            if self._closed:
                raise RuntimeError("the memory manager is closed")
            return self._run(key, fn)

    def _run(self, key: str, fn: Callable[[], T]) -> tuple[T, RunTiming]:
        layout = self._layouts[key]
        started = self.clock()
        job = self._reserve_and_load(layout)
        pipelined = self.pipelined and layout.learned
        active = _ActiveRun(threading.get_ident(), layout, job,
                            {id(b.module): b for b in layout.blocks})
        loading = {id(s) for s in job.slots()} if job is not None else set()
        for slot in layout.slots:
            if id(slot) not in loading:      # loaded by an earlier job, maybe still copying
                self._wait_visible(active, slot)
        if job is not None and not pipelined:
            active.stall_before_s += self._wait_job(job)
            # Every slot, not only those whose module's hook will fire: a parameter used by its
            # parent's forward would otherwise be read before its copy finished.
            for slot in job.slots():
                self._wait_visible(active, slot)
        run_clock = self.backend.run_clock()
        if run_clock is not None:
            run_clock.start()
        self._active = active
        fn_start = self.clock()
        try:
            result = fn()
        finally:
            self._active = None
        fn_end = self.clock()
        if run_clock is not None:
            run_clock.stop()
        if job is not None:
            self._wait_job(job)        # normally done already: every block had to be ready
        if not layout.learned:
            self._learn_order(layout, active.fired)
        timing = self._timing(job, active, started, fn_start, fn_end, run_clock)
        with self._lock:
            now = self.clock()
            for s in layout.slots:
                s.last_used = now
            self._model_last_used[key] = now
            layout.runs += 1
            c = self.counters
            c.runs += 1
            c.load_s += timing.load_s
            c.run_s += timing.run_s
            c.stall_s += timing.stall_s
            c.hidden_s += timing.hidden_s
            self._emit(MemoryEvent("run", key, fn_start, fn_end, 0, self.resident_bytes))
        return result, timing

    def _reserve_and_load(self, layout: ModelLayout) -> Optional[_LoadJob]:
        with self._lock:
            missing = [s for s in layout.slots if s.state is SlotState.HOST]
            if not missing:
                return None
            needed = sum(s.nbytes for s in missing)
            free = self.budget_bytes - self.resident_bytes
            if needed > free:
                self._evict(self.choose_victims(needed - free, layout.key))
            for s in missing:
                s.state = SlotState.LOADING
                s.ready.clear()
            self.resident_bytes += needed
            self._check_budget()
            layout.loads += 1
            layout.bytes_loaded += needed
            job = _LoadJob(layout.key, self._plan_groups(layout, {id(s) for s in missing}))
        self._start_loader()
        self._jobs.put(job)
        return job

    def _plan_groups(self, layout: ModelLayout, missing: set[int]) -> list[list[tuple[Block, list[TensorSlot]]]]:
        groups: list[list[tuple[Block, list[TensorSlot]]]] = []
        current: list[tuple[Block, list[TensorSlot]]] = []
        current_bytes = 0
        taken: set[int] = set()
        order = sorted(layout.wait_at_root) + [i for i in layout.load_order if i not in layout.wait_at_root]
        for index in order:
            block = layout.blocks[index]
            slots = [s for s in block.slots if id(s) in missing and id(s) not in taken]
            if not slots:
                continue
            taken.update(id(s) for s in slots)
            current.append((block, slots))
            current_bytes += sum(s.nbytes for s in slots)
            if current_bytes >= self.group_min_bytes:
                groups.append(current)
                current, current_bytes = [], 0
        if current:
            groups.append(current)
        return groups

    def _before_module(self, module: nn.Module, args: Any) -> None:
        active = self._active
        if active is None or active.thread_id != threading.get_ident():
            raise OutsideRunError(f"{type(module).__name__} of a model under the memory budget ran outside "
                                  f"MemoryManager.run; its weights may not be on the device")
        if module is active.layout.root and active.layout.wait_at_root:
            for index in sorted(active.layout.wait_at_root):
                self._wait_block(active, active.layout.blocks[index])
        block = active.block_by_module.get(id(module))
        if block is None:
            return
        active.fired.append(block.index)
        self._wait_block(active, block)

    def _wait_block(self, active: _ActiveRun, block: Block) -> None:
        for slot in block.slots:
            if not slot.ready.is_set():
                waited_from = self.clock()
                while not slot.ready.wait(_WAIT_POLL_S):
                    self._raise_if_failed(active.job)
                    if active.job is None or active.job.done.is_set():
                        if not slot.ready.is_set():   # no load will ever fill it
                            raise RuntimeError(f"{active.layout.key}: a layer was never loaded")
                active.stall_inside_s += self.clock() - waited_from
            self._wait_visible(active, slot)

    def _wait_visible(self, active: _ActiveRun, slot: TensorSlot) -> None:
        if id(slot) not in active.waited:
            self.backend.wait(slot)
            active.waited.add(id(slot))

    def _wait_job(self, job: _LoadJob) -> float:
        waited_from = self.clock()
        while not job.done.wait(_WAIT_POLL_S):
            pass
        self._raise_if_failed(job)
        return self.clock() - waited_from

    @staticmethod
    def _raise_if_failed(job: Optional[_LoadJob]) -> None:
        if job is not None and job.error is not None:
            raise RuntimeError(f"loading {job.model_key} failed: {job.error}") from job.error

    def _learn_order(self, layout: ModelLayout, fired: list[int]) -> None:
        seen: dict[int, None] = {}
        for index in fired:
            seen.setdefault(index, None)
        order = list(seen)
        unfired = [b.index for b in layout.blocks if b.index not in seen]
        layout.load_order = unfired + order
        layout.wait_at_root = set(unfired)
        layout.learned = True

    def _timing(self, job: Optional[_LoadJob], active: _ActiveRun, started: float, fn_start: float,
                fn_end: float, run_clock: Any) -> RunTiming:
        wall = self.clock() - started
        if job is None:
            run_s = run_clock.elapsed_s() if run_clock is not None else fn_end - fn_start
            return RunTiming(0.0, run_s, 0.0, 0.0, wall, 0)
        nbytes = sum(s.nbytes for s in job.slots())
        device_load_s = self.backend.job_load_s(job)
        run_from = run_clock.started_after_s(job) if run_clock is not None else None
        if device_load_s is not None and run_from is not None:
            run_s = run_clock.elapsed_s()
            # Both intervals measured from the copy's start: the overlap is their intersection.
            hidden = max(0.0, min(device_load_s, run_from + run_s) - max(0.0, run_from))
            return RunTiming(device_load_s, run_s, max(0.0, device_load_s - hidden), hidden, wall, nbytes)
        load_s = job.busy_s
        run_s = max(0.0, (fn_end - fn_start) - active.stall_inside_s)
        hidden = max(0.0, load_s - active.stall_s)
        return RunTiming(load_s, run_s, active.stall_s, hidden, wall, nbytes)

    # ------------------------------------------------------------------ loader thread
    def _start_loader(self) -> None:
        if self._loader is None or not self._loader.is_alive():
            self._loader = threading.Thread(target=self._load_loop, name="memory-loader", daemon=True)
            self._loader.start()

    def _load_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._load(job)
            except BaseException as exc:       # surfaced to the waiting executor
                log.exception("loading %s failed", job.model_key)
                job.error = exc
                self._release_unloaded(job)
            finally:
                job.done.set()

    def _release_unloaded(self, job: _LoadJob) -> None:
        """Slots a failed load never filled go back to the host, and their bytes to the budget,
        so the next run loads them again instead of waiting for them forever."""
        with self._lock:
            for group in job.groups:
                for _, slots in group:
                    for slot in slots:
                        if slot.state is SlotState.LOADING:
                            slot.state = SlotState.HOST
                            self._unindex_device(slot)
                            self.backend.evict(slot)
                            self.resident_bytes -= slot.nbytes

    def _load(self, job: _LoadJob) -> None:
        job.started = self.clock()
        self.backend.begin_job(job)
        for group in job.groups:
            group_start = self.clock()
            slots = [s for _, ss in group for s in ss]
            nbytes = sum(s.nbytes for s in slots)
            self.backend.load_group(slots, job)
            group_end = self.clock()
            with self._lock:
                for s in slots:
                    self._index_device(s)
                    s.state = SlotState.RESIDENT
                    s.ready.set()
                self.counters.loads += 1
                self.counters.bytes_loaded += nbytes
                self._emit(MemoryEvent("load", job.model_key, group_start, group_end, nbytes,
                                       self.resident_bytes))
        self.backend.end_job(job)
        job.ended = self.clock()
        job.busy_s = job.ended - job.started

    def _index_device(self, slot: TensorSlot) -> None:
        if slot.device is not None:
            self._slot_by_ptr[slot.device.data_ptr()] = slot

    def _unindex_device(self, slot: TensorSlot) -> None:
        if slot.device is not None:
            self._slot_by_ptr.pop(slot.device.data_ptr(), None)

    # ------------------------------------------------------------------ invariants, stats
    def _check_budget(self) -> None:
        if self.resident_bytes > self.budget_bytes:
            raise BudgetExceededError(f"resident {self.resident_bytes} B > budget {self.budget_bytes} B")
        self.counters.peak_resident_bytes = max(self.counters.peak_resident_bytes, self.resident_bytes)

    def _emit(self, event: MemoryEvent) -> None:
        for listener in self.listeners:
            listener(event)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self.counters
            out: dict[str, Any] = {
                "device": str(self.device),
                "budget_bytes": self.budget_bytes,
                "resident_bytes": self.resident_bytes,
                "peak_resident_bytes": c.peak_resident_bytes,
                "registered_bytes": self.total_registered_bytes(),
                "granularity": self.granularity.value, "eviction": self.eviction.value,
                "pipelined": self.pipelined,
                "transfer": self.backend.name,
                "bandwidth_gbps": round(self.effective_bandwidth() / 1e9, 3),
                "runs": c.runs, "loads": c.loads, "evictions": c.evictions,
                "bytes_loaded": c.bytes_loaded, "bytes_evicted": c.bytes_evicted,
                "load_s": round(c.load_s, 4), "run_s": round(c.run_s, 4),
                "stall_s": round(c.stall_s, 4), "hidden_load_s": round(c.hidden_s, 4),
                "overlap": round(c.hidden_s / c.load_s, 3) if c.load_s > 0 else None,
                "models": {k: {"bytes": l.nbytes, "resident_bytes": self.resident_bytes_of(k),
                               "blocks": len(l.blocks), "runs": l.runs, "loads": l.loads,
                               "bytes_loaded": l.bytes_loaded}
                           for k, l in self._layouts.items()},
            }
        out.update(self.backend.stats())
        return out

    def close(self) -> None:
        """Stop loading and give every registered module back as plain host tensors (device
        copies freed, hooks removed), so the models can be placed or registered again."""
        with self._run_lock:          # never while a run is using the device copies
            if self._loader is not None and self._loader.is_alive():
                self._jobs.put(None)
                self._loader.join(timeout=5.0)
            with self._lock:
                for slot in self._slots:
                    self._unindex_device(slot)
                    self.backend.restore(slot)
                    slot.state = SlotState.HOST
                    slot.ready.clear()
                self.resident_bytes = 0
                for handle in self._hooks:
                    handle.remove()
                self._hooks.clear()
                self._hooked_modules.clear()
                self._closed = True


def unique_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the distinct tensor storages of all `modules` together (shared ones once)."""
    storages: dict[int, int] = {}
    for module in modules:
        for t in list(module.parameters()) + [b for b in module.buffers() if b is not None]:
            if t.numel():
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
