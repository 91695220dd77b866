"""The family builders' pieces that decide what a copy trains on: never the frames `edgeva merge`
holds out, and boxes placed where the network sees them."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import make_detector_family as family  # noqa: E402

from edgeva.merging.workload import read_camera_frames  # noqa: E402
from edgeva.models.outputs import Detections  # noqa: E402
from edgeva.models.preprocess import letterbox_batch  # noqa: E402
from tests.conftest import write_test_clip  # noqa: E402


@pytest.mark.parametrize("frames", [260, 900])
def test_detector_family_trains_on_exactly_the_frames_merge_does_not_hold_out(tmp_path, monkeypatch, frames):
    monkeypatch.setattr(family, "FRAMES_PER_CAMERA", 120)
    monkeypatch.setattr(family, "MIN_HELDOUT", 40)
    clip = write_test_clip(tmp_path / "c.mp4", frames=frames, size=(640, 96))
    train_idx, held_idx = family.split_indices(frames)
    merge = read_camera_frames(str(clip), 120, None, min_heldout=40)
    assert len(train_idx) == len(merge.train) and len(held_idx) == len(merge.heldout)
    ours = family.read_frames(clip, train_idx)
    assert all(np.array_equal(a, b) for a, b in zip(ours, merge.train))
    assert not set(train_idx) & set(held_idx)


def test_teacher_boxes_land_where_the_letterboxed_network_sees_them():
    frame = np.zeros((360, 640, 3), np.uint8)
    x, boxes_in = letterbox_batch([frame], 320)
    names = ["person", "bicycle", "car"]
    det = Detections(np.array([[320, 180, 384, 216], [0, 0, 64, 36], [10, 10, 20, 20]], np.float32),
                     np.array([0.9, 0.2, 0.8], np.float32), np.array([2, 2, 0], np.int64))
    batch = family.targets([det], names, ("car",), boxes_in, x.shape[2:])
    # only the confident car is kept; the low-score car and the person (not counted) are not
    assert batch["cls"].tolist() == [[2.0]]
    h, w = x.shape[2:]
    cx, cy, bw, bh = batch["bboxes"][0].tolist()
    lb = boxes_in[0]
    assert cx * w == pytest.approx(352 * lb.gain + lb.pad_x, abs=0.5)
    assert cy * h == pytest.approx(198 * lb.gain + lb.pad_y, abs=0.5)
    assert bw * w == pytest.approx(64 * lb.gain, abs=0.5) and bh * h == pytest.approx(36 * lb.gain, abs=0.5)
