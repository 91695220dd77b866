"""The device memory budget: which model tensors are resident, layer-granular load/evict,
pinned host copies, and pipelined swap-in (PipeSwitch-style) through forward pre-hooks.

Units:
  * TensorSlot: one unique tensor storage. A parameter shared by several models (merging
    makes modules hold the same nn.Parameter) is one slot, so it is counted and moved once.
    Residency, budget accounting and eviction work on slots.
  * Block: the tensors owned directly by one module (parameters and buffers, recurse=False),
    in execution order. A forward pre-hook on the module waits until its block is loaded,
    so any nn.Module runs block by block unchanged while later blocks are still in transit.

On CUDA the device copies are real (allocated by the loader on a copy stream from pinned
host copies; execution waits on per-group CUDA events). On the CPU the "device" is edgeva's
own accounting and a transfer takes bytes / bandwidth of simulated time (a sleep on the
loader thread, so compute proceeds meanwhile), which makes everything testable here.
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

log = logging.getLogger("edgeva.memory")

T = TypeVar("T")
DEFAULT_BANDWIDTH_BYTES_PER_S = 12e9     # pinned PCIe Gen3 x16 (CUDA best-practices guide)
DEFAULT_GROUP_MIN_BYTES = 1 << 20        # loads are issued in groups of >= 1 MiB of blocks
_WAIT_POLL_S = 0.5


class ModelTooLargeError(ValueError):
    """A model's weights alone exceed the whole memory budget: it could never be resident."""


class BudgetExceededError(RuntimeError):
    """Resident bytes went over the budget: a bug in the manager, never expected."""


class Granularity(str, enum.Enum):
    BLOCK = "block"      # evict single tensors (layers) by policy
    MODEL = "model"      # evict whole models (the classic time-sharing baseline)


class EvictionPolicy(str, enum.Enum):
    BELADY = "belady"    # farthest next use in the upcoming schedule
    LRU = "lru"


class SlotState(enum.Enum):
    HOST = "host"
    LOADING = "loading"
    RESIDENT = "resident"


@dataclass(frozen=True)
class _TensorOwner:
    """One place a slot's tensor is referenced from: module.<name>, as a view of the storage."""

    module: nn.Module
    name: str
    is_param: bool
    dtype: torch.dtype
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(eq=False)
class TensorSlot:
    key: int
    nbytes: int
    owners: list[_TensorOwner] = field(default_factory=list)
    users: set[tuple[str, int]] = field(default_factory=set)      # (model key, block index)
    state: SlotState = SlotState.HOST
    ready: threading.Event = field(default_factory=threading.Event)
    last_used: float = 0.0
    host_flat: Optional[torch.Tensor] = None     # CUDA only: pinned uint8 copy of the storage
    device_flat: Optional[torch.Tensor] = None
    cuda_ready: Any = None                       # CUDA only: event recorded after its copy

    def models(self) -> set[str]:
        return {m for m, _ in self.users}


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
    cuda_start: Any = None
    cuda_end: Any = None


@dataclass
class _ActiveRun:
    thread_id: int
    layout: ModelLayout
    job: Optional[_LoadJob]
    block_by_module: dict[int, Block]
    fired: list[int] = field(default_factory=list)
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
                 clock: Callable[[], float] = time.monotonic):
        if budget_bytes <= 0:
            raise ValueError(f"memory budget must be positive, got {budget_bytes} bytes")
        self.budget_bytes = int(budget_bytes)
        self.device = torch.device(device)
        self.on_cuda = self.device.type == "cuda"
        if self.on_cuda and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available")
        self.bandwidth_bytes_per_s = float(bandwidth_bytes_per_s)
        self.simulate_transfer = simulate_transfer
        self.granularity = Granularity(granularity)
        self.eviction = EvictionPolicy(eviction)
        self.pipelined = pipelined
        self.group_min_bytes = group_min_bytes
        self.listeners = list(listeners)
        self.clock = clock
        self.resident_bytes = 0
        self.counters = _Counters()
        self._layouts: dict[str, ModelLayout] = {}
        self._slots: dict[int, TensorSlot] = {}            # storage data_ptr -> slot
        self._hooks: list[Any] = []
        self._hooked_modules: set[int] = set()
        self._upcoming: list[str] = []
        self._model_last_used: dict[str, float] = {}
        self._lock = threading.RLock()
        self._active: Optional[_ActiveRun] = None
        self._jobs: "queue.Queue[Optional[_LoadJob]]" = queue.Queue()
        self._loader: Optional[threading.Thread] = None
        self._measured_bandwidth: Optional[float] = None
        if self.on_cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            self._compute_stream = torch.cuda.default_stream(self.device)

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
            blocks: list[Block] = []
            for name, mod in module.named_modules():
                tensors = [(n, t, True) for n, t in mod.named_parameters(recurse=False)]
                tensors += [(n, t, False) for n, t in mod.named_buffers(recurse=False) if t is not None]
                slots: dict[int, TensorSlot] = {}
                for attr, tensor, is_param in tensors:
                    if tensor.numel() == 0:
                        continue
                    slot = self._slot_for(mod, attr, tensor, is_param)
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

    def _slot_for(self, mod: nn.Module, attr: str, tensor: torch.Tensor, is_param: bool) -> TensorSlot:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        slot = self._slots.get(ptr)
        if slot is None:
            slot = TensorSlot(ptr, storage.nbytes())
            self._slots[ptr] = slot
            if self.on_cuda:
                host = torch.empty(slot.nbytes, dtype=torch.uint8).pin_memory()
                host.untyped_storage().copy_(storage)
                slot.host_flat = host
                self._slots[host.untyped_storage().data_ptr()] = slot
        owner = _TensorOwner(mod, attr, is_param, tensor.dtype, tensor.storage_offset(),
                             tuple(tensor.shape), tuple(tensor.stride()))
        slot.owners.append(owner)
        if slot.host_flat is not None:
            _rebind(owner, slot.host_flat)      # frees the device copy the model was built with
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
        return sum({id(s): s.nbytes for s in self._slots.values()}.values())

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
        if self.on_cuda and self._measured_bandwidth:
            return self._measured_bandwidth
        return self.bandwidth_bytes_per_s

    def predicted_load_s(self, key: str) -> float:
        if not self.on_cuda and not self.simulate_transfer:
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
        evictable = [s for s in {id(s): s for s in self._slots.values()}.values()
                     if s.state is SlotState.RESIDENT and id(s) not in protected]
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
            if self.on_cuda:
                for owner in s.owners:
                    _rebind(owner, s.host_flat)
                s.device_flat, s.cuda_ready = None, None
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
        module) while its missing blocks stream in; block k's forward waits for block k."""
        layout = self._layouts[key]
        started = self.clock()
        job = self._reserve_and_load(layout)
        pipelined = self.pipelined and layout.learned
        active = _ActiveRun(threading.get_ident(), layout, job,
                            {id(b.module): b for b in layout.blocks})
        if job is not None and not pipelined:
            active.stall_before_s += self._wait_job(job)
        if self.on_cuda:
            run_start = torch.cuda.Event(enable_timing=True)
            run_end = torch.cuda.Event(enable_timing=True)
            run_start.record(self._compute_stream)
        self._active = active
        fn_start = self.clock()
        try:
            result = fn()
        finally:
            self._active = None
        fn_end = self.clock()
        if self.on_cuda:
            run_end.record(self._compute_stream)
        if job is not None:
            self._wait_job(job)        # normally done already: every block had to be ready
        if not layout.learned:
            self._learn_order(layout, active.fired)
        timing = self._timing(job, active, started, fn_start, fn_end,
                              (run_start, run_end) if self.on_cuda else None)
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
            return
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
            if self.on_cuda and slot.cuda_ready is not None:
                torch.cuda.current_stream(self.device).wait_event(slot.cuda_ready)

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
                fn_end: float, cuda_run: Optional[tuple[Any, Any]]) -> RunTiming:
        wall = self.clock() - started
        if job is None:
            return RunTiming(0.0, fn_end - fn_start, 0.0, 0.0, wall, 0)
        nbytes = sum(s.nbytes for g in job.groups for _, slots in g for s in slots)
        if cuda_run is not None and job.cuda_start is not None:
            torch.cuda.synchronize(self.device)
            run_start, run_end = cuda_run
            load_s = job.cuda_start.elapsed_time(job.cuda_end) / 1e3
            run_s = run_start.elapsed_time(run_end) / 1e3
            # Both intervals measured from the copy's start: the overlap is their intersection.
            run_from = job.cuda_start.elapsed_time(run_start) / 1e3
            hidden = max(0.0, min(load_s, run_from + run_s) - max(0.0, run_from))
            if load_s > 0:
                self._measured_bandwidth = nbytes / load_s
            return RunTiming(load_s, run_s, max(0.0, load_s - hidden), hidden, wall, nbytes)
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
                            self.resident_bytes -= slot.nbytes

    def _load(self, job: _LoadJob) -> None:
        job.started = self.clock()
        if self.on_cuda:
            job.cuda_start = torch.cuda.Event(enable_timing=True)
            job.cuda_end = torch.cuda.Event(enable_timing=True)
            job.cuda_start.record(self._copy_stream)
        sent = 0
        for group in job.groups:
            group_start = self.clock()
            nbytes = sum(s.nbytes for _, slots in group for s in slots)
            if self.on_cuda:
                self._copy_group(group)
            elif self.simulate_transfer:
                sent += nbytes
                # Sleep to the cumulative deadline so sleep overshoot does not add up.
                delay = job.started + sent / self.bandwidth_bytes_per_s - self.clock()
                if delay > 0:
                    time.sleep(delay)
            group_end = self.clock()
            with self._lock:
                for _, slots in group:
                    for s in slots:
                        s.state = SlotState.RESIDENT
                        s.ready.set()
                self.counters.loads += 1
                self.counters.bytes_loaded += nbytes
                self._emit(MemoryEvent("load", job.model_key, group_start, group_end, nbytes,
                                       self.resident_bytes))
        if self.on_cuda:
            job.cuda_end.record(self._copy_stream)
        job.ended = self.clock()
        job.busy_s = job.ended - job.started

    def _copy_group(self, group: list[tuple[Block, list[TensorSlot]]]) -> None:
        with torch.cuda.stream(self._copy_stream):
            slots = [s for _, ss in group for s in ss]
            for s in slots:
                flat = torch.empty(s.nbytes, dtype=torch.uint8, device=self.device)
                flat.copy_(s.host_flat, non_blocking=True)
                flat.record_stream(self._compute_stream)   # freed on eviction only after its last use
                s.device_flat = flat
                for owner in s.owners:
                    _rebind(owner, flat)
            event = torch.cuda.Event()
            event.record(self._copy_stream)
            for s in slots:
                s.cuda_ready = event

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
                "transfer": "cuda" if self.on_cuda else ("simulated" if self.simulate_transfer else "none"),
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
        if self.on_cuda:
            out["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
            out["cuda_reserved_bytes"] = torch.cuda.memory_reserved(self.device)
            out.update(nvml_device_stats(self.device.index or 0))
        return out

    def close(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._hooked_modules.clear()
        if self._loader is not None and self._loader.is_alive():
            self._jobs.put(None)
            self._loader.join(timeout=5.0)


def _rebind(owner: _TensorOwner, flat: torch.Tensor) -> None:
    view = torch.empty(0, dtype=owner.dtype, device=flat.device).set_(
        flat.untyped_storage(), owner.offset, owner.size, owner.stride)
    if owner.is_param:
        getattr(owner.module, owner.name).data = view
    else:
        setattr(owner.module, owner.name, view)   # a registered buffer: Module.__setattr__ rebinds it


def unique_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the distinct tensor storages of all `modules` together (shared ones once)."""
    storages: dict[int, int] = {}
    for module in modules:
        for t in list(module.parameters()) + [b for b in module.buffers() if b is not None]:
            if t.numel():
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def nvml_device_stats(index: int) -> dict[str, Any]:
    """Device memory, utilisation and temperature from NVML; {} when unavailable."""
    try:
        import pynvml
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
    except Exception:
        return {}
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle)
        temp = pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)
        return {"nvml_memory_used_bytes": int(mem.used), "nvml_memory_total_bytes": int(mem.total),
                "nvml_gpu_util_pct": int(util.gpu), "nvml_memory_util_pct": int(util.memory),
                "nvml_temperature_c": int(temp)}
    except Exception:
        return {}
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"
