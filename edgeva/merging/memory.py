"""Resident weight memory, measured: distinct tensor storages (CPU) or CUDA allocations."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

import torch
from torch import nn


def resident_weight_bytes(modules: Iterable[nn.Module]) -> int:
    """Bytes of the distinct storages behind every parameter and buffer of `modules`.

    Tensors that share a storage (shared parameters) count once, so this is what the
    process really holds for these weights, whatever the device.
    """
    seen: dict[tuple[str, int], int] = {}
    for module in modules:
        for tensor in (*module.parameters(), *module.buffers()):
            storage = tensor.untyped_storage()
            seen[(str(tensor.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


@dataclass
class MemoryMeasurement:
    method: str                    # "storages" or "cuda.memory_allocated"
    bytes_before: int
    bytes_after: int

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after

    def to_stats(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_saved"] = self.bytes_saved
        out["saved_fraction"] = self.bytes_saved / self.bytes_before if self.bytes_before else 0.0
        return out


def measure_storages(before: Mapping[str, nn.Module], after: Mapping[str, nn.Module]) -> MemoryMeasurement:
    return MemoryMeasurement("storages", resident_weight_bytes(before.values()), resident_weight_bytes(after.values()))


def cuda_loaded_bytes(load: Callable[[], Any], device: str = "cuda") -> Optional[int]:
    """CUDA bytes allocated by `load()` (which must move weights to `device` and return them,
    so they stay alive while measuring); None without CUDA."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    kept = load()
    torch.cuda.synchronize(device)
    used = torch.cuda.memory_allocated(device) - start
    del kept
    return used
