#!/usr/bin/env python
"""Render synthetic street clips with ground-truth sidecars (see videos/README.md).

    python tools/make_clips.py                      # videos/demo_street.mp4 (+ .truth.json)
    python tools/make_clips.py --preset quiet --preset busy --out /tmp/clips --force

A clip whose sidecar records the same spec hash is left alone unless --force.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from edgeva.synthetic import PRESETS, ensure_clip, existing_clip, load_truth, truth_path_for  # noqa: E402


def clip_name(preset: str) -> str:
    return f"{preset}_street.mp4"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=sorted(PRESETS),
                        help="preset to render; repeat for several (default: demo)")
    parser.add_argument("--all", action="store_true", help="render every preset")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "videos", help="output folder (default: videos/)")
    parser.add_argument("--force", action="store_true", help="re-render even when an up-to-date clip exists")
    args = parser.parse_args(argv)

    presets = sorted(PRESETS) if args.all else (args.preset or ["demo"])
    for name in presets:
        spec = PRESETS[name]
        target = args.out / clip_name(name)
        current = None if args.force else existing_clip(spec, target)
        if current is not None:
            print(f"{name}: up to date, {current} (use --force to re-render)")
            continue
        started = time.monotonic()
        video, _ = ensure_clip(spec, target, force=True)
        elapsed = time.monotonic() - started
        truth = load_truth(video)
        busy = sum(1 for f in truth.frames if f.objects)
        size_mb = video.stat().st_size / 1e6
        print(f"{name}: wrote {video} ({size_mb:.1f} MB, {len(truth.frames)} frames "
              f"{spec.width}x{spec.height}@{spec.fps:g}, {busy} with objects) "
              f"and {truth_path_for(video).name} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
