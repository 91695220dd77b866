"""Shared fixtures: small clips made by the tests, the ../shared folder when present."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


def write_test_clip(path: Path, frames: int = 50, fps: float = 25.0, size: tuple[int, int] = (160, 120)) -> Path:
    """A clip with a square moving across a grey background; each frame differs."""
    w, h = size
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    assert writer.isOpened(), f"cannot write {path}"
    for i in range(frames):
        img = np.full((h, w, 3), 90, np.uint8)
        x = int((w - 20) * i / max(1, frames - 1))
        cv2.rectangle(img, (x, h // 3), (x + 20, h // 3 + 20), (40, 200, 240), -1)
        writer.write(img)
    writer.release()
    return path


@pytest.fixture(scope="session")
def small_clip(tmp_path_factory) -> Path:
    return write_test_clip(tmp_path_factory.mktemp("clips") / "small.mp4")


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared is absent")
    return SHARED


def has_ffmpeg() -> bool:
    return shutil.which("ffmpeg") is not None and subprocess.run(
        ["ffmpeg", "-version"], capture_output=True).returncode == 0
