"""A small classical detector for tests: blobs that differ from the scene's empty background.

Deterministic per frame and its output follows the scene (unlike a random-weight network,
which finds nothing), so filtering and the pipeline can be judged against it.
"""
from __future__ import annotations

import cv2
import numpy as np

from edgeva.models.coco import COCO_NAMES
from edgeva.models.outputs import Detections

CAR = COCO_NAMES.index("car")


class BlobDetector:
    name = "blob"
    kind = "detector"
    class_names = list(COCO_NAMES)
    is_torch = False
    module = None

    def __init__(self, background: np.ndarray, min_area: int = 120, delay_s: float = 0.0):
        self.background = cv2.GaussianBlur(background, (5, 5), 0).astype(np.int16)
        self.min_area = min_area
        self.delay_s = delay_s
        self.calls = 0

    def predict(self, images: list[np.ndarray]) -> list[Detections]:
        import time

        self.calls += 1
        if self.delay_s:
            time.sleep(self.delay_s * len(images))
        return [self._detect(img) for img in images]

    def _detect(self, image: np.ndarray) -> Detections:
        background = self.background
        if background.shape != image.shape:      # any frame size, as a real detector takes
            background = cv2.resize(background, (image.shape[1], image.shape[0]))
        diff = np.abs(cv2.GaussianBlur(image, (5, 5), 0).astype(np.int16) - background).max(axis=2)
        mask = cv2.morphologyEx((diff > 40).astype(np.uint8), cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
        n, _, st, _ = cv2.connectedComponentsWithStats(mask)
        boxes = [[x, y, x + w, y + h] for x, y, w, h, area in st[1:n] if area >= self.min_area]
        if not boxes:
            return Detections.empty()
        k = len(boxes)
        return Detections(np.array(boxes, np.float32), np.full(k, 0.9, np.float32), np.full(k, CAR, np.int64))
