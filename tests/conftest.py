"""Shared fixtures: small clips made by the tests, the ../shared folder when present."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import cv2
import numpy as np
import pytest
import torch

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


def wait_until(pred: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `pred` until it returns something true (returned), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def one_torch_thread():
    """Small models on busy shared cores: one intra-op thread is much faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
