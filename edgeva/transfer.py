"""Transfer backends of the memory manager: where a tensor slot's bytes live and how they move.

The manager (`memory.py`) decides *what* is resident (budget, eviction, load order, pipelining);
a backend only carries out *how*: keep a host copy, make a device copy of a group of slots,
make the compute side wait for that copy, free it on eviction, and time copies and runs.

  * `CudaBackend`: pinned host copies, copies on a side stream, one CUDA event per load group;
    the compute stream waits on the event of every slot it uses (never a global synchronize),
    and each device copy is `record_stream`-ed on the stream that used it, so the caching
    allocator cannot hand its block to the next load while a kernel still reads it.
  * `SimulatedBackend`: the same contract on the CPU. A transfer takes bytes / bandwidth of
    simulated time on the loader thread. With `copies=True` the device copy is a real,
    separate tensor that starts as poison (NaN) and is filled only when the compute side waits
    on it, just as a CUDA kernel that skips the event wait may read a half-copied tensor; an
    evicted or released copy is poisoned too, like freed device memory that gets reused. So a
    missing wait or a use after eviction shows up on the CPU as NaN outputs. With
    `copies=False` it only sleeps and accounts (what the swap benchmark's CPU figures used).
"""
from __future__ import annotations

import enum
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn

POISON_BYTE = 0xFF    # every float dtype reads 0xFF..FF as NaN


class SlotState(enum.Enum):
    HOST = "host"
    LOADING = "loading"
    RESIDENT = "resident"


@dataclass(frozen=True)
class TensorOwner:
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
    """One unique tensor storage (shared parameters of merged models are one slot)."""

    key: int
    nbytes: int
    owners: list[TensorOwner] = field(default_factory=list)
    users: set[tuple[str, int]] = field(default_factory=set)      # (model key, block index)
    state: SlotState = SlotState.HOST
    ready: threading.Event = field(default_factory=threading.Event)  # the loader issued its copy
    last_used: float = 0.0
    host: Optional[torch.Tensor] = None       # flat uint8 host copy (pinned on CUDA)
    device: Optional[torch.Tensor] = None     # flat uint8 device copy while loading/resident
    copied: Any = None                        # backend handle: the copy is complete once waited on
    waited_by: set[int] = field(default_factory=set)   # CUDA streams already ordered after `copied`

    def models(self) -> set[str]:
        return {m for m, _ in self.users}

    def bound(self) -> Optional[torch.Tensor]:
        return self.device if self.device is not None else self.host


def rebind(owner: TensorOwner, flat: torch.Tensor) -> None:
    """Point the owner's parameter or buffer at `flat` (a uint8 storage) with its own view."""
    view = torch.empty(0, dtype=owner.dtype, device=flat.device).set_(
        flat.untyped_storage(), owner.offset, owner.size, owner.stride)
    if owner.is_param:
        getattr(owner.module, owner.name).data = view
    else:
        setattr(owner.module, owner.name, view)   # a registered buffer: Module.__setattr__ rebinds it


def flat_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over the whole storage (no copy)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),), (1,))


class RunClock(ABC):
    """Times one execution on the compute side."""

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def stop(self) -> None: ...

    @abstractmethod
    def elapsed_s(self) -> float: ...

    def started_after_s(self, job: Any) -> Optional[float]:
        """Seconds from the job's first copy to this run's start, when the backend can tell."""
        return None


class TransferBackend(ABC):
    """How a slot's bytes get to the device and back. All calls but `wait`/`run_clock` come
    from the manager under its lock or from its loader thread."""

    name: str
    device: torch.device

    @abstractmethod
    def adopt(self, slot: TensorSlot, storage: torch.UntypedStorage) -> None:
        """Take charge of a new slot: keep its bytes in `slot.host` (the only copy from now on)."""

    def attach(self, slot: TensorSlot, owner: TensorOwner) -> None:
        """A (new) owner of the slot: bind it to the slot's current copy."""
        bound = slot.bound()
        if bound is not None and self.rebinds:
            rebind(owner, bound)

    @property
    def rebinds(self) -> bool:
        return True

    def begin_job(self, job: Any) -> None:
        """Before the first group of a load job (loader thread)."""

    @abstractmethod
    def load_group(self, slots: list[TensorSlot], job: Any) -> None:
        """Issue the device copies of `slots` and bind their owners to them (loader thread).
        The data may arrive later: users must `wait` on each slot first."""

    def end_job(self, job: Any) -> None:
        """After the last group of a load job (loader thread)."""

    @abstractmethod
    def wait(self, slot: TensorSlot) -> None:
        """Make the slot's copy visible to the calling (compute) thread's stream."""

    @abstractmethod
    def evict(self, slot: TensorSlot) -> None:
        """Bind owners back to the host copy and free the device copy."""

    def restore(self, slot: TensorSlot) -> None:
        """On close: the module ends as plain host tensors, the device copy freed."""
        self.evict(slot)

    def run_clock(self) -> Optional[RunClock]:
        """A device-side timer for one run; None: the manager times runs on its own clock."""
        return None

    def job_load_s(self, job: Any) -> Optional[float]:
        """Copy time of a finished job as the device measured it; None: use the loader's time."""
        return None

    @abstractmethod
    def allocated_bytes(self) -> int:
        """Device bytes the backend's copies hold (CUDA: the allocator's figure, all of it)."""

    def stats(self) -> dict[str, Any]:
        return {}


class SimulatedBackend(TransferBackend):
    """The CPU stand-in for a device (see the module comment)."""

    def __init__(self, bandwidth_bytes_per_s: float, *, sleep: bool = True, copies: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        self.name = "simulated" if sleep else "none"
        self.device = torch.device("cpu")
        self.bandwidth_bytes_per_s = float(bandwidth_bytes_per_s)
        self.sleep = sleep
        self.copies = copies
        self.clock = clock
        self._allocated = 0
        self.peak_allocated = 0
        self._lock = threading.Lock()

    @property
    def rebinds(self) -> bool:
        return self.copies

    def adopt(self, slot: TensorSlot, storage: torch.UntypedStorage) -> None:
        slot.host = flat_bytes(storage)

    def begin_job(self, job: Any) -> None:
        job.sent_bytes = 0

    def load_group(self, slots: list[TensorSlot], job: Any) -> None:
        nbytes = sum(s.nbytes for s in slots)
        if self.sleep:
            job.sent_bytes += nbytes
            # Sleep to the cumulative deadline so sleep overshoot does not add up.
            delay = job.started + job.sent_bytes / self.bandwidth_bytes_per_s - self.clock()
            if delay > 0:
                time.sleep(delay)
        if not self.copies:
            return
        pending = _PendingCopy(slots)
        for s in slots:
            s.device = torch.full((s.nbytes,), POISON_BYTE, dtype=torch.uint8)
            s.copied = pending
            for owner in s.owners:
                rebind(owner, s.device)
        with self._lock:
            self._allocated += nbytes
            self.peak_allocated = max(self.peak_allocated, self._allocated)

    def wait(self, slot: TensorSlot) -> None:
        pending = slot.copied
        if isinstance(pending, _PendingCopy):
            pending.complete()

    def evict(self, slot: TensorSlot) -> None:
        if not self.copies or slot.device is None:
            return
        for owner in slot.owners:
            rebind(owner, slot.host)
        slot.device.fill_(POISON_BYTE)      # whoever still reads it reads garbage, as on a device
        slot.device, slot.copied = None, None
        with self._lock:
            self._allocated -= slot.nbytes

    def allocated_bytes(self) -> int:
        return self._allocated

    def stats(self) -> dict[str, Any]:
        return {"simulated_copies": self.copies, "simulated_allocated_bytes": self._allocated,
                "simulated_peak_allocated_bytes": self.peak_allocated} if self.copies else {}


class _PendingCopy:
    """The CPU analogue of a copy-stream event: the bytes land when the compute side waits."""

    def __init__(self, slots: list[TensorSlot]):
        self._slots = slots
        self._lock = threading.Lock()
        self._done = False

    def complete(self) -> None:
        with self._lock:
            if self._done:
                return
            for s in self._slots:
                if s.device is not None:
                    s.device.copy_(s.host)
            self._done = True


class CudaBackend(TransferBackend):
    """Pinned host copies, a side copy stream, per-group events (see the module comment)."""

    name = "cuda"

    def __init__(self, device: torch.device):
        if device.type != "cuda" or not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        self.device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        self.copy_stream = torch.cuda.Stream(self.device)
        self.measured_bandwidth: Optional[float] = None

    def adopt(self, slot: TensorSlot, storage: torch.UntypedStorage) -> None:
        host = torch.empty(slot.nbytes, dtype=torch.uint8, pin_memory=True)
        host.copy_(flat_bytes(storage))     # a model built on the device is copied out once
        slot.host = host

    def begin_job(self, job: Any) -> None:
        job.cuda_start = torch.cuda.Event(enable_timing=True)
        job.cuda_end = torch.cuda.Event(enable_timing=True)
        job.cuda_start.record(self.copy_stream)

    def load_group(self, slots: list[TensorSlot], job: Any) -> None:
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            for s in slots:
                flat = torch.empty(s.nbytes, dtype=torch.uint8, device=self.device)
                flat.copy_(s.host, non_blocking=True)     # pinned source: a true async DMA
                s.device = flat
                s.waited_by = set()
                for owner in s.owners:
                    rebind(owner, flat)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        for s in slots:
            s.copied = event

    def end_job(self, job: Any) -> None:
        job.cuda_end.record(self.copy_stream)

    def wait(self, slot: TensorSlot) -> None:
        event, flat = slot.copied, slot.device
        if event is None or flat is None:
            return
        stream = torch.cuda.current_stream(self.device)
        if stream.cuda_stream in slot.waited_by:      # ordered after the copy already
            return
        stream.wait_event(event)
        # Allocated on the copy stream, used on this one: when it is freed (evicted), the
        # allocator may not reuse its block before the work queued on this stream has finished.
        flat.record_stream(stream)
        slot.waited_by.add(stream.cuda_stream)

    def evict(self, slot: TensorSlot) -> None:
        for owner in slot.owners:
            rebind(owner, slot.host)
        slot.device, slot.copied = None, None      # the allocator frees it after its recorded uses
        slot.waited_by = set()

    def run_clock(self) -> RunClock:
        return _CudaClock(self.device)

    def job_load_s(self, job: Any) -> Optional[float]:
        if getattr(job, "cuda_end", None) is None:
            return None
        job.cuda_end.synchronize()          # this job's copies only, not the whole device
        load_s = job.cuda_start.elapsed_time(job.cuda_end) / 1e3
        nbytes = sum(s.nbytes for s in job.slots())
        if load_s > 0:
            self.measured_bandwidth = nbytes / load_s
        return load_s

    def allocated_bytes(self) -> int:
        return torch.cuda.memory_allocated(self.device)

    def stats(self) -> dict[str, Any]:
        from edgeva.gpu import nvml_device_stats

        index = self.device.index or 0
        return {"cuda_allocated_bytes": torch.cuda.memory_allocated(self.device),
                "cuda_reserved_bytes": torch.cuda.memory_reserved(self.device),
                **nvml_device_stats(index)}


class _CudaClock(RunClock):
    def __init__(self, device: torch.device):
        self._device = device
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        self._start.record(torch.cuda.current_stream(self._device))

    def stop(self) -> None:
        self._end.record(torch.cuda.current_stream(self._device))

    def elapsed_s(self) -> float:
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1e3

    def started_after_s(self, job: Any) -> Optional[float]:
        start = getattr(job, "cuda_start", None)
        if start is None:
            return None
        self._end.synchronize()
        return start.elapsed_time(self._start) / 1e3


def make_backend(device: torch.device, bandwidth_bytes_per_s: float, *, simulate_transfer: bool = True,
                 simulate_copies: bool = False, clock: Callable[[], float] = time.monotonic) -> TransferBackend:
    if device.type == "cuda":
        return CudaBackend(device)
    return SimulatedBackend(bandwidth_bytes_per_s, sleep=simulate_transfer, copies=simulate_copies, clock=clock)
