#!/usr/bin/env python3
"""Fetch the demo's real weights through the libraries' own downloads into a local folder.

    .venv/bin/python tools/fetch_weights.py [--out weights] [MODEL ...]

ultralytics models (yolov8n...) download their release checkpoint as <out>/<model>.pt;
torchvision models (mobilenet_v3_small...) their IMAGENET1K/COCO weights, saved as a state
dict with the class names as <out>/<model>.pth. A config with `weights_dir: <out>` uses them
(configs/demo.yaml does). Each file is checked by loading it back and only then moved into
place, so a failed or partial download never leaves a broken file. Offline, every model
fails with a one-line reason and the exit status is 1; tools/setup.sh carries on without them.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO_MODELS = ("yolov8n", "mobilenet_v3_small")


def fetch(name: str, out: Path) -> Path:
    """Download `name`'s weights into `out`; the path written. Raises on any failure."""
    import torch

    from edgeva.models import build_model
    from edgeva.models.ultralytics_zoo import YOLO_NAMES

    out.mkdir(parents=True, exist_ok=True)
    if name in YOLO_NAMES:
        target = out / f"{name}.pt"
        with tempfile.TemporaryDirectory(dir=out) as staging:
            staged = Path(staging) / target.name
            build_model(name, str(staged), download=True)      # ultralytics' own asset download
            if not staged.is_file():
                raise RuntimeError(f"ultralytics reported success but wrote no {staged.name}")
            build_model(name, str(staged))                      # loads back as a checkpoint
            os.replace(staged, target)
        return target
    target = out / f"{name}.pth"
    model = build_model(name, download=True)                    # torchvision's own download (cache: TORCH_HOME)
    fd, staged_name = tempfile.mkstemp(dir=out, suffix=".pth")
    os.close(fd)
    staged = Path(staged_name)
    try:
        torch.save({"state_dict": model.module.state_dict(), "class_names": list(model.class_names)}, staged)
        build_model(name, str(staged))
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", default=list(DEMO_MODELS), help=f"zoo names (default: {DEMO_MODELS})")
    parser.add_argument("--out", default=str(REPO / "weights"), help="folder for the weights (default: weights/)")
    args = parser.parse_args(argv)
    failed = 0
    for name in args.models:
        try:
            path = fetch(name, Path(args.out))
        except Exception as exc:   # offline, a proxy, a changed release: report and go on
            failed += 1
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"fetch-weights: {name}: not fetched ({reason})", file=sys.stderr)
            continue
        print(f"fetch-weights: {name}: {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
