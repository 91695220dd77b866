#!/usr/bin/env python
"""Benchmark Gemel-style merging on configs/gemel_workload.yaml.

Part 1 (analysis, seconds): builds every model of the workload (architecture only), lists the
groups of identical layers, and measures resident weight bytes before/after sharing *all* of
them (Gemel's MaxMerge, no retraining; distinct storages on CPU, CUDA allocation when present).

Part 2 (incremental merge, --time-budget): a retrainable variant of the workload, one
architecture (--arch) with different weights per camera: each copy starts from its own seed and
is briefly trained toward its own synthetic target on its camera's frames (quartile of a region
contrast: diagonal / left-right / top-bottom), so outputs differ and are not degenerate. Then the same code
path as `edgeva merge` runs with the budget; resident bytes before/after (measured), per-query
agreement and merge time are printed.

    .venv/bin/python tools/bench_merge.py --time-budget 150
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from edgeva.config import load_config  # noqa: E402
from edgeva.merging import analyse_modules, format_analysis, merge_main, resident_weight_bytes  # noqa: E402
from edgeva.merging.sharing import share_group  # noqa: E402
from edgeva.merging.workload import read_camera_frames, workload_from_config  # noqa: E402
from edgeva.models import build_model  # noqa: E402
from edgeva.models.preprocess import resize_normalise  # noqa: E402


def region_feature(kind: str, img: np.ndarray) -> float:
    g = img.mean(axis=2)
    h, w = g.shape[0] // 2, g.shape[1] // 2
    if kind == "quadrant":       # diagonal contrast
        return float(g[:h, :w].mean() + g[h:, w:].mean() - g[:h, w:].mean() - g[h:, :w].mean())
    if kind == "strip":          # left vs right
        return float(g[:, :w].mean() - g[:, w:].mean())
    return float(g[:h].mean() - g[h:].mean())  # band: top vs bottom


def quartile_labels(kind: str, frames: list[np.ndarray]) -> torch.Tensor:
    """4 balanced classes on every camera: the quartile of a region contrast among its frames."""
    values = np.array([region_feature(kind, f) for f in frames])
    edges = np.quantile(values, [0.25, 0.5, 0.75])
    return torch.tensor(np.searchsorted(edges, values), dtype=torch.long)


def part1_analysis(config: Path) -> dict:
    t0 = time.monotonic()
    cfg = load_config(config)
    wl = workload_from_config(cfg, read_frames=False)
    analysis = analyse_modules(wl.modules, wl.architectures)
    print(format_analysis(analysis, limit=15))
    before = resident_weight_bytes(wl.modules.values())
    for g in analysis.groups:
        share_group(wl.modules, g)
    after = resident_weight_bytes(wl.modules.values())
    out = {"models": len(wl.models), "groups": len(analysis.groups), "analysed_saving": analysis.total_bytes_saved,
           "measured_before": before, "measured_after": after, "seconds": round(time.monotonic() - t0, 1)}
    if torch.cuda.is_available():
        import copy

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        merged = [m.to("cuda") for m in copy.deepcopy(list(wl.modules.values()))]
        out["cuda_merged_bytes"] = torch.cuda.memory_allocated() - base
        del merged
    print(f"\nMaxMerge (all groups, no retraining): resident weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
          f"measured (saved {(before - after) / 2**20:.1f} MiB = {100 * (before - after) / before:.1f}%; analysed "
          f"{analysis.total_bytes_saved / 2**20:.1f} MiB) in {out['seconds']}s")
    return out


def specialise(arch: str, seed: int, frames: list[np.ndarray], target: str, size: int, steps: int) -> dict:
    torch.manual_seed(seed)
    model = build_model(arch)
    net = model.module.train()
    x = resize_normalise(frames, size)
    y = quartile_labels(target, frames)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (16,), generator=gen)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        top1 = net(x).argmax(1)
    print(f"  {arch} seed {seed} -> {target}: train accuracy {(top1 == y).float().mean():.2f}, "
          f"{len(set(top1.tolist()))} distinct labels")
    return net.state_dict()


def part2_merge(config: Path, args: argparse.Namespace) -> dict:
    cfg = load_config(config)
    work = REPO_ROOT / "var" / "merge_bench"
    (work / "weights").mkdir(parents=True, exist_ok=True)
    cameras = [c for c in cfg.cameras if c.id in ("highway", "junction", "crossing")]
    targets = ["quadrant", "strip", "band"]
    t0 = time.monotonic()
    queries = []
    for i, (cam, target) in enumerate(zip(cameras, targets)):
        weights = work / "weights" / f"{args.arch}_{cam.id}.pt"
        if not weights.exists() or args.refresh:
            frames = read_camera_frames(cam.source, 96, 160).train
            torch.save(specialise(args.arch, 100 + i, frames, target, args.input_size, args.specialise_steps), weights)
        queries.append({"id": f"{target}-{cam.id}", "camera": cam.id, "model": args.arch, "weights": str(weights),
                        "task": {"type": "classify"}, "accuracy_target": args.target})
    derived = {"cameras": [{"id": c.id, "source": c.source} for c in cameras], "queries": queries}
    derived_path = work / "retrain.yaml"
    derived_path.write_text(yaml.safe_dump(derived, sort_keys=False))
    print(f"specialised weights ready in {time.monotonic() - t0:.1f}s; derived config {derived_path}")
    out = work / "out"
    argv = [str(derived_path), "--out", str(out), "--frames", str(args.frames), "--input-size", str(args.input_size),
            "--steps", str(args.steps), "--eval-every", "10", "--lr", str(args.lr), "--threads", str(args.threads)]
    if args.time_budget:
        argv += ["--time-budget", str(args.time_budget)]
    merge_main(argv)
    return json.loads((out / "report.json").read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "gemel_workload.yaml")
    p.add_argument("--skip-analysis", action="store_true")
    p.add_argument("--skip-merge", action="store_true")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--input-size", type=int, default=64)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--specialise-steps", type=int, default=60)
    p.add_argument("--time-budget", type=float, default=150.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refresh", action="store_true", help="re-train the specialised weights")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary = {}
    if not args.skip_analysis:
        summary["analysis"] = part1_analysis(args.config)
    if not args.skip_merge:
        report = part2_merge(args.config, args)
        mem = report["memory"]
        summary["merge"] = {"bytes_before": mem["bytes_before"], "bytes_after": mem["bytes_after"],
                            "saved_fraction": round(mem["saved_fraction"], 4), "groups_merged": report["groups_merged"],
                            "trials": len(report["attempts"]), "merge_s": report["time"]["merge_s"],
                            "agreement": {q: v["agreement_after"] for q, v in report["queries"].items()}}
    print("\nsummary:", json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
