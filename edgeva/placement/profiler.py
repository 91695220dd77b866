"""Measure a model's split profile on this machine (the reference node of ``edgeva profile``).

Works for models whose forward is the chain of layers of `edgeva.models.splits` (torchvision
ResNet, MobileNet, VGG...); split points are named as that module defines them, so a plan
made from the profile cuts the model where the daemon will. The chain is checked against
``model(x)`` before anything is timed.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence, Union

import torch
from torch import nn

from edgeva.models.splits import chain_layers, needs_flatten, resolve_split, run_layer, split_point_names

from .model import ModelProfile, SplitPoint


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def profile_model(model: nn.Module, input_shape: Sequence[int],
                  split_points: Optional[Sequence[Union[int, str]]] = None,
                  repeats: int = 10, warmup: int = 2, name: Optional[str] = None,
                  device: Union[str, torch.device] = "cpu") -> ModelProfile:
    """Per-split head/tail latency (median of ``repeats`` runs per layer), activation bytes
    and head/tail weight bytes. ``split_points`` picks split points by index (layers before
    the cut, 0..K) or name (the layer the cut follows), as `edgeva.models.splits` defines
    them; default: every one."""
    model = model.eval().to(device)
    layers = chain_layers(model)
    flatten = [needs_flatten(layer) for _, layer in layers]
    x = torch.randn(*input_shape, device=device)
    with torch.inference_mode():
        y = x
        for (_, layer), flat in zip(layers, flatten):
            y = run_layer(layer, y, flat)
        reference = model(x)
        if not isinstance(reference, torch.Tensor) or reference.shape != y.shape or \
                not torch.allclose(reference, y, rtol=1e-3, atol=1e-4):
            raise ValueError("the model's forward is not the chain of its children; cannot split it")
        times = [[] for _ in layers]
        outputs: list[torch.Tensor] = []
        for r in range(warmup + repeats):
            h = x
            outputs = []
            clocks = []
            for i, ((_, layer), flat) in enumerate(zip(layers, flatten)):
                clock = _LayerClock(device)
                h = run_layer(layer, h, flat)
                clock.stop()
                clocks.append(clock)
                outputs.append(h)
            if r >= warmup:
                for i, clock in enumerate(clocks):
                    times[i].append(clock.elapsed_ms())
    layer_ms = [statistics.median(t) for t in times]
    layer_weights = [_module_bytes(m) for _, m in layers]
    names = split_point_names(layers)
    cuts = sorted({0, len(layers)} | {resolve_split(sp, names) for sp in (range(len(names)) if split_points is None else split_points)})
    total_ms, total_w = sum(layer_ms), sum(layer_weights)
    points = []
    for k in cuts:
        head_ms, head_w = sum(layer_ms[:k]), sum(layer_weights[:k])
        act = x if k == 0 else outputs[k - 1]
        points.append(SplitPoint(
            name=names[k],
            head_ms=head_ms, tail_ms=total_ms - head_ms,
            activation_bytes=act.numel() * act.element_size(),
            head_weight_bytes=head_w, tail_weight_bytes=total_w - head_w))
    points[0] = SplitPoint(points[0].name, 0.0, total_ms, points[0].activation_bytes, 0, total_w)
    points[-1] = SplitPoint(points[-1].name, total_ms, 0.0, points[-1].activation_bytes, total_w, 0)
    return ModelProfile(name or type(model).__name__.lower(), points,
                        source=f"profile_model on {_where(device)}, "
                               f"input {list(input_shape)}, median of {repeats}")


class _LayerClock:
    """One layer's time: CUDA events on the current stream (read once the run is over, no
    synchronize between layers), or the wall clock on the CPU."""

    def __init__(self, device: Union[str, torch.device]):
        self._cuda = torch.device(device).type == "cuda"
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._cuda:
            self._end.record()
        else:
            self._t1 = time.perf_counter()

    def elapsed_ms(self) -> float:
        if self._cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end)
        return (self._t1 - self._t0) * 1e3


def _where(device: Union[str, torch.device]) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{torch.get_num_threads()} CPU threads"
