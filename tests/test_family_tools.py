"""The detector family builder places the teacher's boxes where the letterboxed network sees them."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import make_detector_family as family  # noqa: E402

from edgeva.models.outputs import Detections  # noqa: E402
from edgeva.models.preprocess import letterbox_batch  # noqa: E402


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
