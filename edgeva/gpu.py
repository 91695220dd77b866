"""What the process knows about its accelerator: the resolved device and NVML's figures."""
from __future__ import annotations

from typing import Any

import torch


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


def device_report(device: torch.device | str) -> dict[str, Any]:
    """The `device` section of `edgeva stats`: which device runs the models and, on CUDA, its
    name, the allocator's figures and NVML's memory, utilisation and temperature."""
    device = torch.device(device)
    out: dict[str, Any] = {"device": str(device), "cuda_available": torch.cuda.is_available()}
    if device.type != "cuda" or not torch.cuda.is_available():
        return out
    index = device.index if device.index is not None else torch.cuda.current_device()
    out.update({"name": torch.cuda.get_device_name(index),
                "allocated_bytes": torch.cuda.memory_allocated(index),
                "reserved_bytes": torch.cuda.memory_reserved(index),
                **nvml_device_stats(index)})
    return out
