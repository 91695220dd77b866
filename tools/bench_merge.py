#!/usr/bin/env python
"""Benchmark Gemel-style merging the way a fleet would use it.

Part 1 (analysis, seconds): configs/gemel_workload.yaml's models (architecture only): groups of
identical layers, and resident bytes measured before/after sharing all of them (MaxMerge).

Part 2 (merge): the model family of configs/family.yaml (tools/make_family.py builds it into
var/family/ the first time: a detector-labelled ResNet18 base and five per-camera / per-task
copies fine-tuned from it on three cameras) merged by `edgeva merge` within --time-budget seconds (the whole
command: frames, originals' outputs, merge steps, final check) at each query's configured input
size (224 px), agreement checked on >= 200 held-out frames per camera.

Part 3 (daemon): `edgeva run` on the eval/ clips (never used for tuning or merging), once with
the unmerged weights and once with the bundle, every frame inferred; `edgeva stats` of the
merged run gives the resident bytes the daemon measured after loading the bundle, and the two
runs' per-frame results are compared with each query's own agreement function.

Part 4 (speed): each model's `predict` on the same frames, unmerged and from the bundle, in one
process (median of repeats): what holding layers as base + residual costs per frame, since a
residual layer rebuilds its dense weight every time it runs.

    nice -n 10 .venv/bin/python tools/bench_merge.py --time-budget 1200
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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
from edgeva.confidence import wilson_lower_bound  # noqa: E402
from edgeva.merging.sharing import share_group  # noqa: E402
from edgeva.merging.workload import workload_from_config  # noqa: E402
from edgeva.models.tasks import TASKS  # noqa: E402

EVAL = REPO_ROOT.parent / "shared" / "videos" / "eval"
EVAL_CAMERAS = {   # family camera -> the eval clips it watches in part 3 (each query runs once per clip)
    "highway": ("bgslibrary_video02_highway_cctv.avi", "degirum_Traffic.mp4"),   # another highway; a junction
    "junction": ("degirum_Traffic.mp4",),
    "crossing": ("bgslibrary_video02_highway_cctv.avi",),                         # the eval clip with walkers
    "corridor": ("intel_car-detection.mp4",),
}


FAMILY_BUILDERS = {"family.yaml": "make_family.py", "detector_family.yaml": "make_detector_family.py"}


def _stem(clip: str) -> str:
    return Path(clip).stem


def part1_analysis(config: Path) -> dict:
    t0 = time.monotonic()
    wl = workload_from_config(load_config(config), read_frames=False)
    analysis = analyse_modules(wl.modules, wl.architectures)
    print(format_analysis(analysis, limit=15))
    before = resident_weight_bytes(wl.modules.values())
    for g in analysis.groups:
        share_group(wl.modules, g)
    after = resident_weight_bytes(wl.modules.values())
    out = {"models": len(wl.models), "groups": len(analysis.groups), "analysed_saving": analysis.total_bytes_saved,
           "measured_before": before, "measured_after": after, "seconds": round(time.monotonic() - t0, 1)}
    print(f"\nMaxMerge (all groups, no retraining): resident weights {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB "
          f"measured (saved {(before - after) / 2**20:.1f} MiB = {100 * (before - after) / before:.1f}%; analysed "
          f"{analysis.total_bytes_saved / 2**20:.1f} MiB) in {out['seconds']}s")
    return out


def part2_merge(config: Path, out: Path, args: argparse.Namespace) -> dict:
    cfg = load_config(config)
    missing = [q.weights for q in cfg.queries if q.weights and not Path(q.weights).exists()]
    if missing:
        print(f"building the family (missing {len(missing)} weights files) ...", flush=True)
        t0 = time.monotonic()
        builder = FAMILY_BUILDERS.get(config.name, "make_family.py")
        subprocess.run([sys.executable, str(REPO_ROOT / "tools" / builder)], check=True)
        print(f"family built in {time.monotonic() - t0:.0f}s")
    argv = [str(config), "--out", str(out), "--time-budget", str(args.time_budget), "--steps", str(args.steps),
            "--eval-every", str(args.eval_every), "--lr", str(args.lr), "--batch", str(args.batch),
            "--threads", str(args.threads), "--distil-on", args.distil_on, "--check-on", args.check_on, "--accept-on", args.accept_on,
            "--probe", str(args.probe), "--residuals", args.residuals]
    t0 = time.monotonic()
    merge_main(argv)
    wall = time.monotonic() - t0
    report = json.loads((out / "report.json").read_text())
    report["time"]["bench_wall_s"] = round(wall, 1)
    return report


def _run_daemon(cfg: dict, tmp: Path, name: str) -> tuple[dict, Path, float]:
    """`edgeva run` until the clips end; `edgeva stats --json` taken once the models are loaded."""
    db = tmp / f"{name}.db"
    endpoint = f"ipc://{tmp}/{name}.sock"
    cfg = dict(cfg, stats={"endpoint": endpoint}, sinks={"sqlite": str(db), "flush_s": 0.5})
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    exe = [sys.executable, "-m", "edgeva"]
    t0 = time.monotonic()
    proc = subprocess.Popen([*exe, "run", "--config", str(path), "--until-end"], env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stats = None
    while proc.poll() is None:
        time.sleep(2)
        got = subprocess.run([*exe, "stats", "--json", "--endpoint", endpoint, "--timeout", "5"],
                             capture_output=True, text=True)
        if got.returncode == 0:
            snap = json.loads(got.stdout)
            if snap.get("memory", {}).get("resident_bytes"):
                stats = snap
                latest = snap
                while proc.poll() is None:            # keep the last snapshot for the frame counts
                    time.sleep(3)
                    again = subprocess.run([*exe, "stats", "--json", "--endpoint", endpoint, "--timeout", "5"],
                                           capture_output=True, text=True)
                    if again.returncode == 0:
                        latest = json.loads(again.stdout)
                stats["last"] = latest
                break
    _, err = proc.communicate()
    if proc.returncode != 0 or stats is None:
        raise RuntimeError(f"edgeva run ({name}) failed: rc {proc.returncode}\n{err[-2000:]}")
    return stats, db, time.monotonic() - t0


def part3_daemon(config: Path, bundle: Path) -> dict:
    from edgeva.sinks import read_results

    raw = yaml.safe_load(config.read_text())
    base = config.parent
    cams = {c["id"]: c for c in raw["cameras"]}
    eval_cameras = {f"{cid}-{_stem(clip)}": (cid, clip) for cid in cams for clip in EVAL_CAMERAS[cid]}
    eval_queries = [dict(q, id=f"{q['id']}-{_stem(clip)}", camera=eid, weights=str((base / q["weights"]).resolve()),
                         filter={"enabled": False}, sla={"latency_ms": 600000}, queue=64)
                    for q in raw["queries"] for eid, (cid, clip) in eval_cameras.items() if cid == q["camera"]]
    eval_cfg = {
        "cameras": [{"id": eid, "source": str(EVAL / clip), "replay": "fast"} for eid, (_, clip) in eval_cameras.items()],
        "queries": eval_queries,
        "gpu": {"device": "cpu", "max_batch": 8},
    }
    tmp = Path(tempfile.mkdtemp(prefix="edgeva-merge-run-"))
    unmerged, db_a, secs_a = _run_daemon(eval_cfg, tmp, "unmerged")
    merged, db_b, secs_b = _run_daemon(dict(eval_cfg, merging={"bundle": str(bundle.resolve())}), tmp, "merged")
    per_query = {}
    for q in eval_queries:
        agree = TASKS[q["task"]["type"]].agreement
        a = {r["seq"]: r["value"] for r in read_results(db_a, q["id"], limit=10**6) if r["outcome"] == "inferred"}
        b = {r["seq"]: r["value"] for r in read_results(db_b, q["id"], limit=10**6) if r["outcome"] == "inferred"}
        both = sorted(set(a) & set(b))
        values = [agree(a[s], b[s]) for s in both]
        mean = float(np.mean(values)) if values else float("nan")
        answers = [json.dumps(a[s]["label"] if isinstance(a[s], dict) and "label" in a[s] else a[s], sort_keys=True)
                   for s in both]
        per_query[q["id"]] = {"frames": len(both), "agreement": round(mean, 4),
                              "lower_bound": round(wilson_lower_bound(mean, len(both)), 4),
                              "unmerged_majority_fraction": round(max(answers.count(v) for v in set(answers))
                                                                  / len(answers), 3) if answers else None,
                              "distinct_unmerged_answers": len(set(answers)),
                              "clip": eval_cameras[q["camera"]][1]}
    mem_a, mem_b = unmerged["memory"], merged["memory"]
    return {"unmerged_resident_bytes": mem_a["resident_bytes"], "merged_resident_bytes": mem_b["resident_bytes"],
            "merged_stats_bytes_saved_by_sharing": mem_b.get("bytes_saved_by_sharing"),
            "merged_stats_unshared_bytes": mem_b.get("unshared_bytes"),
            "saved_fraction": round(1 - mem_b["resident_bytes"] / mem_a["resident_bytes"], 4),
            "seconds": {"unmerged": round(secs_a, 1), "merged": round(secs_b, 1)},
            "queries": per_query,
            "frames_in": {q: s["frames_in"] for q, s in merged["last"]["queries"].items()}}


def part4_speed(config: Path, bundle: Path, frames: int = 8, repeats: int = 7) -> dict:
    from edgeva.merging import load_bundle

    wl = workload_from_config(load_config(config), read_frames=False)
    merged = load_bundle(bundle)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (360, 640, 3), dtype=np.uint8) for _ in range(frames)]
    out = {}
    for key, original in wl.models.items():
        times = {"unmerged": [], "merged": []}
        for _ in range(repeats):          # interleaved, so a busy moment hits both alike
            for name, model in (("unmerged", original), ("merged", merged.models[key])):
                t0 = time.perf_counter()
                model.predict(images)
                times[name].append(time.perf_counter() - t0)
        a, b = (float(np.median(times[n])) * 1000 / frames for n in ("unmerged", "merged"))
        out[key] = {"unmerged_ms_per_frame": round(a, 2), "merged_ms_per_frame": round(b, 2), "ratio": round(b / a, 3)}
        print(f"{key}: {a:.1f} ms/frame unmerged, {b:.1f} merged ({b / a:.2f}x)", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--analysis-config", type=Path, default=REPO_ROOT / "configs" / "gemel_workload.yaml")
    p.add_argument("--config", type=Path, default=REPO_ROOT / "configs" / "family.yaml")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "var" / "merge" / "family")
    p.add_argument("--skip-analysis", action="store_true")
    p.add_argument("--skip-merge", action="store_true", help="reuse the bundle in --out")
    p.add_argument("--skip-daemon", action="store_true")
    p.add_argument("--time-budget", type=float, default=1200.0)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--distil-on", choices=("own", "all"), default="all")
    p.add_argument("--check-on", choices=("own", "all"), default="own")
    p.add_argument("--accept-on", choices=("mean", "lower-bound"), default="mean")
    p.add_argument("--probe", type=int, default=0, help="edgeva merge --probe")
    p.add_argument("--residuals", choices=("none", "int8"), default="none", help="edgeva merge --residuals")
    p.add_argument("--skip-speed", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary: dict = {}
    if not args.skip_analysis:
        summary["analysis"] = part1_analysis(args.analysis_config)
    if not args.skip_merge:
        report = part2_merge(args.config, args.out, args)
        mem = report["memory"]
        summary["merge"] = {"bytes_before": mem["bytes_before"], "bytes_after": mem["bytes_after"],
                            "saved_fraction": round(mem["saved_fraction"], 4), "groups_merged": report["groups_merged"],
                            "trials": len(report["attempts"]), "time": report["time"],
                            "agreement": {q: [v["agreement_after"], v["lower_bound_after"], v["heldout_frames"]]
                                          for q, v in report["queries"].items()}}
    if not args.skip_daemon:
        summary["daemon"] = part3_daemon(args.config, args.out / "bundle.pt")
    if not args.skip_speed:
        summary["speed"] = part4_speed(args.config, args.out / "bundle.pt")
    print("\nsummary:", json.dumps(summary, indent=1))
    (args.out / "bench_summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
