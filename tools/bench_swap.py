#!/usr/bin/env python3
"""Swap-aware scheduling benchmark: fraction of frames processed within their SLA when a
workload's weights get only a fraction (default 50%) of their size as device memory.

Modes (same queries, frames, budget):
  a  whole-model round-robin swap: LRU whole-model eviction, load then run, fixed order
  b  a + merged layers: the two resnet18 queries share their conv layers (Gemel-style:
     identical Conv2d modules become one object; BatchNorm and heads stay private)
  c  b + layer-granular Belady eviction, swap-aware order, pipelined (PipeSwitch) loads

On the CPU transfers are simulated at --bandwidth-gbps (sleeps on the loader thread, so
compute continues meanwhile); on CUDA they are real and measured. The default 1 GB/s keeps
the load/run ratio of a V100 on PCIe Gen3 (ResNet50: 8.3 ms load vs 2.7 ms run, about 3x):
one shared core here runs ResNet50 at 64 px in ~30 ms, and 102 MB at 1 GB/s takes ~100 ms.

  .venv/bin/python tools/bench_swap.py --duration 20 --plot /tmp/swap_timeline.png
"""
from __future__ import annotations

import argparse
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeva.work import WorkItem  # noqa: E402
from edgeva.memory import MemoryEvent, unique_bytes  # noqa: E402
from edgeva.messages import DropReason, Frame  # noqa: E402
from edgeva.models.base import ZooModel  # noqa: E402
from edgeva.models.device import resolve_device  # noqa: E402
from edgeva.models.zoo import build_model  # noqa: E402
from edgeva.scheduler import SwapOptions, SwapScheduler  # noqa: E402

QUERIES = {  # query -> (zoo model, classes in its head)
    "r18-cars": ("resnet18", 1000),
    "r18-people": ("resnet18", 10),
    "r50-trucks": ("resnet50", 1000),
    "mnv3-bikes": ("mobilenet_v3_large", 1000),
}
MODES = {
    "a": ("whole-model round-robin", False, SwapOptions.whole_model_round_robin()),
    "b": ("+ merged layers", True, SwapOptions.whole_model_round_robin()),
    "c": ("+ swap-aware order, Belady layers, pipelined loads", True, SwapOptions()),
}


@dataclass
class Tally:
    """The owner of every bench frame: counts its one callback."""

    query_id: str
    generated: int = 0
    rejected: int = 0
    within_sla: int = 0
    late: int = 0
    drops: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def complete(self, item: WorkItem, output: Any, finished_mono: float) -> None:
        with self.lock:
            if finished_mono <= item.deadline_mono:
                self.within_sla += 1
            else:
                self.late += 1

    def dropped(self, item: WorkItem, reason: DropReason) -> None:
        with self.lock:
            self.drops[reason.value] = self.drops.get(reason.value, 0) + 1

    @property
    def fraction(self) -> float:
        return self.within_sla / self.generated if self.generated else 0.0


def build_workload(size: int, merged: bool, device: torch.device) -> dict[str, ZooModel]:
    torch.manual_seed(0)
    models: dict[str, ZooModel] = {}
    for query, (name, classes) in QUERIES.items():
        model = build_model(name, device="cpu")
        if classes != 1000:
            model.module.fc = nn.Linear(model.module.fc.in_features, classes)
            model.class_names = [str(i) for i in range(classes)]
        model.input_size = size
        models[query] = model
    if merged:
        share_identical_convs(models["r18-cars"].module, models["r18-people"].module)
    for model in models.values():
        model.to(device)
    return models


def share_identical_convs(base: nn.Module, other: nn.Module) -> int:
    """Make `other` use `base`'s Conv2d/Linear objects where the paths and definitions match
    (what a Gemel merge ends with); returns the number of shared layers."""
    base_modules = dict(base.named_modules())
    shared = 0
    for name, module in list(other.named_modules()):
        twin = base_modules.get(name)
        if (isinstance(module, (nn.Conv2d, nn.Linear)) and type(twin) is type(module)
                and repr(twin) == repr(module)):
            parent_name, _, attr = name.rpartition(".")
            setattr(other.get_submodule(parent_name) if parent_name else other, attr, twin)
            shared += 1
    return shared


def generate(ports: dict[str, Any], tallies: dict[str, Tally], fps: float, sla_s: float, duration_s: float,
             images: list[np.ndarray], stop: threading.Event) -> None:
    """Frames for every query at `fps`, phases spread over one frame interval."""
    start = time.monotonic()
    interval = 1.0 / fps
    keys = list(ports)
    schedule = sorted((start + i * interval + q * interval / len(keys), q, i)
                      for q in range(len(keys)) for i in range(int(duration_s * fps)))
    for due, q, seq in schedule:
        if stop.is_set():
            return
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        key = keys[q]
        now = time.monotonic()
        frame = Frame(key, seq, time.time(), now, images[seq % len(images)])
        tally = tallies[key]
        with tally.lock:
            tally.generated += 1
        if not ports[key].submit(WorkItem(tally, frame, now + sla_s)):
            with tally.lock:
                tally.rejected += 1


@dataclass
class ModeResult:
    mode: str
    label: str
    fraction: float
    per_query: dict[str, float]
    stats: dict[str, Any]
    events: list[MemoryEvent]
    t0: float


def run_mode(mode: str, args: argparse.Namespace, device: torch.device, budget: int,
             images: list[np.ndarray]) -> ModeResult:
    label, merged, options = MODES[mode]
    options = SwapOptions(**{**options.__dict__, "bandwidth_bytes_per_s": args.bandwidth_gbps * 1e9,
                             "max_batch": args.max_batch})
    models = build_workload(args.size, merged, device)
    events: list[MemoryEvent] = []
    scheduler = SwapScheduler(models, budget, device=device, options=options, listeners=[events.append])
    scheduler.start()
    warm = {k: Tally(k) for k in models}
    for key in models:                       # one learning run each: profiles and block order
        for _ in range(2):
            scheduler.port(key).submit(WorkItem(warm[key], Frame(key, -1, 0, time.monotonic(), images[0]),
                                                time.monotonic() + 60))
    while scheduler.pending():
        time.sleep(0.05)
    time.sleep(0.3)
    events.clear()
    tallies = {k: Tally(k) for k in models}
    stop = threading.Event()
    t0 = time.monotonic()
    ports = {k: scheduler.port(k) for k in models}
    generate(ports, tallies, args.fps, args.sla_ms / 1e3, args.duration, images, stop)
    time.sleep(args.sla_ms / 1e3 + 0.2)
    scheduler.stop()
    stats = scheduler.stats()
    generated = sum(t.generated for t in tallies.values())
    within = sum(t.within_sla for t in tallies.values())
    return ModeResult(mode, label, within / generated if generated else 0.0,
                      {k: round(t.fraction, 3) for k, t in tallies.items()}, stats, list(events), t0)


def plot_timeline(results: list[ModeResult], budget: int, path: Path, window_s: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(QUERIES)
    fig, axes = plt.subplots(2 * len(results), 1, figsize=(12, 3.2 * len(results)),
                             gridspec_kw={"height_ratios": [2, 1] * len(results)})
    colours = dict(zip(keys, plt.cm.tab10.colors))
    for r_index, result in enumerate(results):
        gantt, memory = axes[2 * r_index], axes[2 * r_index + 1]
        start = result.t0 + 2.0
        end = start + window_s
        for event in result.events:
            if event.end < start or event.start > end or event.kind == "evict":
                continue
            row = keys.index(event.model_key)
            y = row + (0.05 if event.kind == "run" else 0.55)
            gantt.broken_barh([(event.start - start, max(event.end - event.start, 1e-4))], (y, 0.4),
                              color=colours[event.model_key], alpha=1.0 if event.kind == "run" else 0.45,
                              hatch=None if event.kind == "run" else "///")
        gantt.set_yticks([i + 0.5 for i in range(len(keys))], keys)
        gantt.set_xlim(0, window_s)
        gantt.set_title(f"({result.mode}) {result.label}: {result.fraction:.1%} of frames within SLA "
                        f"(solid: run, hatched: load)", fontsize=9)
        points = [(e.end - start, e.resident_bytes / 2**20) for e in result.events
                  if start <= e.end <= end]
        if points:
            xs, ys = zip(*sorted(points))
            memory.step(xs, ys, where="post", label="resident")
        memory.axhline(budget / 2**20, color="red", linestyle="--", label="budget")
        memory.set_xlim(0, window_s)
        memory.set_ylabel("MiB")
        memory.legend(loc="lower right", fontsize=7)
    axes[-1].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of frames per mode")
    parser.add_argument("--fps", type=float, default=10.0, help="frames per second per query")
    parser.add_argument("--sla-ms", type=float, default=250.0)
    parser.add_argument("--size", type=int, default=64, help="network input side")
    parser.add_argument("--budget-fraction", type=float, default=0.5,
                        help="device memory budget as a fraction of the unmerged workload's weights")
    parser.add_argument("--bandwidth-gbps", type=float, default=1.0, help="simulated host-to-device GB/s (CPU)")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--modes", default="abc")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1: spinning OpenMP threads on a shared 2-core box are 20x slower)")
    parser.add_argument("--plot", type=Path, help="timeline PNG")
    parser.add_argument("--plot-window", type=float, default=3.0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    workload = build_workload(args.size, merged=False, device=torch.device("cpu"))
    total = unique_bytes(m.module for m in workload.values())
    merged_total = unique_bytes(m.module for m in build_workload(args.size, True, torch.device("cpu")).values())
    budget = int(total * args.budget_fraction)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (args.size, args.size, 3), dtype=np.uint8) for _ in range(8)]
    transfer = "measured (CUDA)" if device.type == "cuda" else f"simulated at {args.bandwidth_gbps} GB/s"
    print(f"workload: {', '.join(f'{q}={n}' for q, (n, _) in QUERIES.items())}; weights {total / 2**20:.1f} MiB "
          f"({merged_total / 2**20:.1f} MiB merged); budget {budget / 2**20:.1f} MiB "
          f"({args.budget_fraction:.0%}); {args.fps:g} fps/query, SLA {args.sla_ms:g} ms, "
          f"input {args.size}px, device {device}, transfer {transfer}")
    results = []
    for mode in args.modes:
        result = run_mode(mode, args, device, budget, images)
        m = result.stats["memory"]
        batches = [s["mean_batch"] for s in result.stats["models"].values() if s["mean_batch"]]
        print(f"({mode}) {result.label:52s} within SLA {result.fraction:6.1%}  per query {result.per_query}")
        print(f"     loaded {m['bytes_loaded'] / 2**20:8.1f} MiB in {m['loads']} groups, "
              f"load {m['load_s']:.2f}s run {m['run_s']:.2f}s hidden {m['hidden_load_s']:.2f}s "
              f"(overlap {m['overlap']}), peak resident {m['peak_resident_bytes'] / 2**20:.1f} MiB, "
              f"mean batch {np.mean(batches) if batches else 0:.2f}")
        results.append(result)
    base = next((r for r in results if r.mode == "a"), None)
    if base is not None and base.fraction > 0:
        for r in results:
            if r is not base:
                print(f"ratio ({r.mode})/(a) = {r.fraction / base.fraction:.2f}x")
    if args.plot:
        plot_timeline(results, budget, args.plot, args.plot_window)
        print(f"timeline: {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
