"""tools/make_camera_variants.py: clips as another camera would film them, for checking the
filter on cameras outside ../shared."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

from make_camera_variants import VARIANTS, main  # noqa: E402

FPS = 10.0
SIZE = (160, 120)


def _source(path: Path, frames: int = 30) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, SIZE)
    for _ in range(frames):
        image = np.full((SIZE[1], SIZE[0], 3), 120, np.uint8)
        cv2.rectangle(image, (30, 40), (60, 80), (250, 250, 250), -1)   # left of the middle
        writer.write(image)
    writer.release()
    return path


def _read(path: Path) -> tuple[list[np.ndarray], float]:
    cap = cv2.VideoCapture(str(path))
    fps = cap.get(cv2.CAP_PROP_FPS)
    frames = []
    while True:
        ok, image = cap.read()
        if not ok:
            break
        frames.append(image.astype(np.float32))
    cap.release()
    return frames, fps


def test_each_variant_keeps_length_rate_and_size_and_changes_the_picture_its_own_way(tmp_path):
    source = _source(tmp_path / "cam.mp4")
    out = tmp_path / "variants"
    assert main([str(source), "--out", str(out)]) == 0
    original, _ = _read(source)
    written = {name: _read(out / f"cam.{name}.mp4") for name in VARIANTS}
    for name, (frames, fps) in written.items():
        assert len(frames) == len(original), name
        assert abs(fps - FPS) < 0.01, name
        assert frames[0].shape == original[0].shape, name

    grain, _ = written["grain"]
    # noise differs from frame to frame on a static scene
    assert np.abs(grain[1] - grain[0]).mean() > 3 * np.abs(original[1] - original[0]).mean() + 1.0

    exposure, _ = written["exposure"]
    background = [float(f[5:15, 100:150].mean()) for f in exposure]   # a flat grey patch
    assert max(background) - min(background) > 20       # the gain drifts while nothing moves

    reframed, _ = written["reframed"]
    bright = reframed[0].mean(axis=2).max(axis=0) > 200    # columns crossing the square
    columns = np.flatnonzero(bright)
    assert columns.size and columns.min() > SIZE[0] // 2   # the square moved to the other side, mirrored


def test_a_chain_is_the_source_then_each_variant_in_turn(tmp_path):
    source = _source(tmp_path / "cam.mp4")
    out = tmp_path / "variants"
    assert main([str(source), "--out", str(out), "--chain"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["cam.chain.mp4"]
    original, _ = _read(source)
    chain, fps = _read(out / "cam.chain.mp4")
    n = len(original)
    assert len(chain) == 4 * n and abs(fps - FPS) < 0.01
    assert np.abs(chain[0] - original[0]).mean() < 5.0                 # first the source (re-encoded)
    assert np.abs(chain[n - 1] - original[-1]).mean() < 5.0
    patch = [float(f[5:15, 100:150].mean()) for f in chain[n:2 * n]]  # then exposure: the gain moves
    assert max(patch) - min(patch) > 20
    assert np.abs(chain[2 * n + 1] - chain[2 * n]).mean() > 3.0        # then grain
    bright = chain[3 * n].mean(axis=2).max(axis=0) > 200               # then reframed: mirrored
    assert np.flatnonzero(bright).min() > SIZE[0] // 2
