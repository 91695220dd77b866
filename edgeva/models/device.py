"""Choosing the torch device from the config's `gpu.device`."""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def resolve_device(requested: str = "auto") -> torch.device:
    """auto | cpu | cuda | cuda:N -> a usable torch.device; CUDA only when it is available."""
    requested = requested.strip().lower()
    if requested == "cpu":
        return torch.device("cpu")
    if requested != "auto" and not (requested == "cuda" or
                                    (requested.startswith("cuda:") and requested[5:].isdigit())):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {requested!r}")
    if not torch.cuda.is_available():
        if requested != "auto":
            log.warning("device %s requested but CUDA is not available; using the CPU", requested)
        else:
            log.info("no CUDA device available; using the CPU")
        return torch.device("cpu")
    if requested == "auto":
        return torch.device("cuda:0")
    device = torch.device(requested if ":" in requested else "cuda:0")
    if device.index is not None and device.index >= torch.cuda.device_count():
        log.warning("device %s does not exist (%d CUDA devices); using cuda:0",
                    requested, torch.cuda.device_count())
        return torch.device("cuda:0")
    return device
