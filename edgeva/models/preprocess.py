"""Turning BGR uint8 frames into model input tensors, and boxes back into frame pixels."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def check_images(images: Sequence[np.ndarray]) -> None:
    for i, img in enumerate(images):
        if not isinstance(img, np.ndarray) or img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            desc = f"{type(img).__name__} {getattr(img, 'shape', '')} {getattr(img, 'dtype', '')}"
            raise ValueError(f"images[{i}] must be an HxWx3 uint8 BGR array, got {desc.strip()}")


@dataclass(frozen=True)
class Letterbox:
    """How one image was scaled and padded into the network input."""

    gain: float
    pad_x: float
    pad_y: float

    def boxes_to_image(self, boxes: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
        out = boxes.astype(np.float32, copy=True)
        out[:, [0, 2]] = (out[:, [0, 2]] - self.pad_x) / self.gain
        out[:, [1, 3]] = (out[:, [1, 3]] - self.pad_y) / self.gain
        h, w = image_shape
        out[:, [0, 2]] = out[:, [0, 2]].clip(0, w)
        out[:, [1, 3]] = out[:, [1, 3]].clip(0, h)
        return out


def letterbox_shape(images: Sequence[np.ndarray], size: int, stride: int) -> tuple[int, int]:
    """Network input (h, w): the smallest stride multiple around the scaled frame when all
    frames share a shape (the usual case for one camera), else a size x size square."""
    shapes = {img.shape[:2] for img in images}
    if len(shapes) != 1:
        return size, size
    h, w = shapes.pop()
    gain = size / max(h, w)
    return (math.ceil(round(h * gain) / stride) * stride,
            math.ceil(round(w * gain) / stride) * stride)


def letterbox_batch(images: Sequence[np.ndarray], size: int, stride: int = 32
                    ) -> tuple[torch.Tensor, list[Letterbox]]:
    """Scale each frame to fit, pad with grey (114) centred; RGB float [0, 1] NCHW."""
    out_h, out_w = letterbox_shape(images, size, stride)
    batch = np.full((len(images), out_h, out_w, 3), 114, np.uint8)
    boxes: list[Letterbox] = []
    for i, img in enumerate(images):
        h, w = img.shape[:2]
        gain = min(out_h / h, out_w / w)
        new_w, new_h = max(1, round(w * gain)), max(1, round(h * gain))
        resized = img if (new_w, new_h) == (w, h) else cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
        top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
        batch[i, top:top + new_h, left:left + new_w] = resized
        # Gains differ slightly per axis after rounding; the mean is within half a pixel.
        boxes.append(Letterbox(gain=(new_w / w + new_h / h) / 2, pad_x=left, pad_y=top))
    tensor = torch.from_numpy(batch[..., ::-1].copy()).permute(0, 3, 1, 2).float().div_(255.0)
    return tensor, boxes


def resize_normalise(images: Sequence[np.ndarray], size: int,
                     mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                     ) -> torch.Tensor:
    """Whole frame stretched to size x size (keeps the full field of view), RGB, normalised, NCHW."""
    batch = np.stack([cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA) for img in images])
    tensor = torch.from_numpy(batch[..., ::-1].copy()).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return tensor.sub_(m).div_(s)


def to_rgb_tensors(images: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """RGB float [0, 1] CHW tensors at native size (torchvision detectors resize themselves)."""
    return [torch.from_numpy(img[..., ::-1].copy()).permute(2, 0, 1).float().div_(255.0) for img in images]
