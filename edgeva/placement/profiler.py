"""Measure a model's split profile on this machine (the reference node of ``edgeva profile``).

Works for models whose forward is a chain of their top-level children, with nested
``nn.Sequential`` blocks expanded one level (torchvision ResNet, MobileNet, VGG...).
A flatten is inserted before the first Linear, as torchvision's forward does. The
chain is checked against ``model(x)`` before anything is timed.
"""
from __future__ import annotations

import statistics
import time
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .model import ModelProfile, SplitPoint


def sequential_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and len(child) > 1 and not _is_head(child):
            layers.extend((f"{name}.{sub}", m) for sub, m in child.named_children())
        else:
            layers.append((name, child))
    return layers


def _is_head(seq: nn.Sequential) -> bool:
    return any(isinstance(m, nn.Linear) for m in seq.children())


def _run_layer(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    first = next(iter(layer.children()), layer) if isinstance(layer, nn.Sequential) else layer
    if x.dim() > 2 and (isinstance(first, (nn.Linear, nn.Dropout)) or
                        (isinstance(layer, nn.Sequential) and _is_head(layer))):
        x = torch.flatten(x, 1)
    return layer(x)


def _module_bytes(m: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))


def profile_model(model: nn.Module, input_shape: Sequence[int],
                  split_points: Optional[Sequence[Union[int, str]]] = None,
                  repeats: int = 10, warmup: int = 2, name: Optional[str] = None,
                  device: Union[str, torch.device] = "cpu") -> ModelProfile:
    """Per-split head/tail latency (median of ``repeats`` runs per layer), activation bytes
    and head/tail weight bytes. ``split_points`` picks boundaries by layer index (a cut
    *before* that layer, 0..K) or layer name (a cut *after* it); default: every boundary."""
    model = model.eval().to(device)
    layers = sequential_layers(model)
    x = torch.randn(*input_shape, device=device)
    with torch.inference_mode():
        y = x
        for _, layer in layers:
            y = _run_layer(layer, y)
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
            for i, (_, layer) in enumerate(layers):
                clock = _LayerClock(device)
                h = _run_layer(layer, h)
                clock.stop()
                clocks.append(clock)
                outputs.append(h)
            if r >= warmup:
                for i, clock in enumerate(clocks):
                    times[i].append(clock.elapsed_ms())
    layer_ms = [statistics.median(t) for t in times]
    layer_weights = [_module_bytes(m) for _, m in layers]
    cuts = _resolve_cuts(split_points, [n for n, _ in layers])
    total_ms, total_w = sum(layer_ms), sum(layer_weights)
    points = []
    for k in cuts:
        head_ms, head_w = sum(layer_ms[:k]), sum(layer_weights[:k])
        act = x if k == 0 else outputs[k - 1]
        points.append(SplitPoint(
            name="input" if k == 0 else layers[k - 1][0],
            head_ms=head_ms, tail_ms=total_ms - head_ms,
            activation_bytes=act.numel() * act.element_size(),
            head_weight_bytes=head_w, tail_weight_bytes=total_w - head_w))
    points[0] = SplitPoint(points[0].name, 0.0, total_ms, points[0].activation_bytes, 0, total_w)
    points[-1] = SplitPoint(points[-1].name, total_ms, 0.0, points[-1].activation_bytes, total_w, 0)
    return ModelProfile(name or type(model).__name__.lower(), points,
                        source=f"profile_model on {_where(device)}, "
                               f"input {list(input_shape)}, median of {repeats}")


def _resolve_cuts(split_points: Optional[Sequence[Union[int, str]]], names: list[str]) -> list[int]:
    n = len(names)
    if split_points is None:
        return list(range(n + 1))
    cuts = {0, n}
    for sp in split_points:
        if isinstance(sp, str):
            if sp not in names:
                raise ValueError(f"unknown layer {sp!r}; layers: {names}")
            cuts.add(names.index(sp) + 1)
        elif 0 <= int(sp) <= n:
            cuts.add(int(sp))
        else:
            raise ValueError(f"split index {sp} outside 0..{n}")
    return sorted(cuts)


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
