#!/usr/bin/env python3
"""Clips that look as if another camera filmed them: a check that the filter holds its target
on cameras whose picture differs from every clip it was developed on.

    .venv/bin/python tools/make_camera_variants.py ../shared/videos/eval/* --out /tmp/edgeva-variants
    .venv/bin/python tools/reference_cache.py /tmp/edgeva-variants/*
    .venv/bin/python tools/bench_filtering.py --clips /tmp/edgeva-variants

Each variant changes what a constant fitted to the shared clips would depend on:
- `grain`: per-frame sensor noise (sigma 12 grey levels), a cheap or night camera. The change
  features' pixel threshold and the background model see a noise floor the clean clips lack.
- `exposure`: the picture's gain drifts and steps (0.7x to 1.2x, a 4 s cycle with a jump every
  5 s), an auto-exposure camera under passing clouds. Brightness compensation removes shifts,
  not gains, so bright areas change while nothing moves.
- `reframed`: mirrored and cropped to the middle 70 %, then scaled back: objects are larger and
  enter at other edges, as from a camera mounted elsewhere.

`--chain` writes instead one clip per source, `<stem>.chain.mp4`: the source as it is, then its
exposure, grain and reframed variants, one after the other: one camera whose conditions change
every clip length (a cloudy afternoon, dusk noise, then the camera moved), the later minutes a
threshold picked on the first ones must carry over to.

The clips are written as MP4 (mp4v) at the source's frame rate and size; the reference is the
detector run on the variant itself, so each variant is judged against what the model sees there.
Keep the output outside the repository (clips are never committed).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

Transform = Callable[[np.ndarray, int, float], np.ndarray]   # (frame, index, fps) -> frame


def grain(frame: np.ndarray, index: int, fps: float) -> np.ndarray:
    rng = np.random.default_rng(index)
    noise = rng.normal(0.0, 12.0, frame.shape).astype(np.float32)
    return np.clip(frame.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def exposure(frame: np.ndarray, index: int, fps: float) -> np.ndarray:
    t = index / fps
    gain = 0.95 + 0.15 * math.sin(2 * math.pi * t / 4.0) + (0.1 if int(t // 5) % 2 else -0.1)
    return cv2.convertScaleAbs(frame, alpha=gain)


def reframed(frame: np.ndarray, index: int, fps: float) -> np.ndarray:
    h, w = frame.shape[:2]
    ch, cw = int(h * 0.7), int(w * 0.7)
    y, x = (h - ch) // 2, (w - cw) // 2
    crop = cv2.flip(frame[y:y + ch, x:x + cw], 1)
    return cv2.resize(crop, (w, h), interpolation=cv2.INTER_LINEAR)


def unchanged(frame: np.ndarray, index: int, fps: float) -> np.ndarray:
    return frame


VARIANTS: dict[str, Transform] = {"grain": grain, "exposure": exposure, "reframed": reframed}
CHAIN: list[Transform] = [unchanged, exposure, grain, reframed]


def write_variant(clip: Path, name: str, transform: Transform, out: Path) -> Path:
    return _write(clip, [transform], out / f"{clip.stem}.{name}.mp4")


def write_chain(clip: Path, out: Path) -> Path:
    return _write(clip, CHAIN, out / f"{clip.stem}.chain.mp4")


def _write(clip: Path, transforms: list[Transform], target: Path) -> Path:
    """`clip` once per transform, one after the other, into `target`; frame indices (what the
    transforms' noise and gain follow) run on across the passes."""
    cap = cv2.VideoCapture(str(clip))
    if not cap.isOpened():
        raise SystemExit(f"cannot open {clip}")
    fps = cap.get(cv2.CAP_PROP_FPS) or 25.0
    size = (int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)))
    cap.release()
    writer = cv2.VideoWriter(str(target), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():
        raise SystemExit(f"cannot write {target}")
    index = 0
    for transform in transforms:
        cap = cv2.VideoCapture(str(clip))
        while True:
            ok, frame = cap.read()
            if not ok:
                break
            writer.write(transform(frame, index, fps))
            index += 1
        cap.release()
    writer.release()
    if index == 0:
        target.unlink(missing_ok=True)
        raise SystemExit(f"no frames decoded from {clip}")
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True, help="folder for the variants (outside the repo)")
    ap.add_argument("--variant", action="append", choices=sorted(VARIANTS), help="default: all")
    ap.add_argument("--chain", action="store_true",
                    help="instead: one clip per source, the source then its exposure, grain and reframed variants")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for clip in args.clips:
        if args.chain:
            print(write_chain(clip, args.out), file=sys.stderr)
            continue
        for name in args.variant or sorted(VARIANTS):
            print(write_variant(clip, name, VARIANTS[name], args.out), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
