"""What a model's predict returns for one image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np


@dataclass(frozen=True)
class Detections:
    """Boxes of one image, in that image's pixel coordinates."""

    boxes: np.ndarray      # (N, 4) float32, x1 y1 x2 y2
    scores: np.ndarray     # (N,) float32
    class_ids: np.ndarray  # (N,) int64, indices into the model's class_names

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.boxes.shape != (n, 4) or self.class_ids.shape != (n,):
            raise ValueError(f"inconsistent detections: boxes {self.boxes.shape}, "
                             f"scores {self.scores.shape}, class_ids {self.class_ids.shape}")

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> "Detections":
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))


@dataclass(frozen=True)
class ClassProbs:
    """Class probabilities of one image (softmax over the model's classes)."""

    probs: np.ndarray  # (C,) float32, sums to 1

    @property
    def top1(self) -> int:
        return int(self.probs.argmax())

    @property
    def top1_prob(self) -> float:
        return float(self.probs[self.top1])


Output = Union[Detections, ClassProbs]
