"""Turning BGR uint8 frames into model input tensors, and boxes back into frame pixels."""
from __future__ import annotations

import functools
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


def resize_long_side(image: np.ndarray, long_side: int | None) -> np.ndarray:
    """The image shrunk (INTER_AREA) so its longer side is at most `long_side`; as it is when None."""
    if long_side is None or max(image.shape[:2]) <= long_side:
        return image
    h, w = image.shape[:2]
    gain = long_side / max(h, w)
    return cv2.resize(image, (max(8, round(w * gain)), max(8, round(h * gain))), interpolation=cv2.INTER_AREA)


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


def normalisation(model: object) -> tuple[Sequence[float], Sequence[float]]:
    """The (mean, std) a classifier's inputs are normalised with: its own, else ImageNet's."""
    return getattr(model, "mean", IMAGENET_MEAN), getattr(model, "std", IMAGENET_STD)


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


# ---------------------------------------------------------------------------- on the device
# The same letterbox and resize as above, as torch ops on uint8 frames uploaded once (from
# pinned memory on CUDA): what the network reads then never crosses PCIe as float32. On CPU
# tensors they compute the same thing as the OpenCV versions (tests compare them).

def upload_frames(images: Sequence[np.ndarray], device: torch.device | str) -> list[torch.Tensor]:
    """HxWx3 uint8 frames as uint8 tensors on `device`: one pinned, asynchronous copy for a
    batch of one shape (the usual case), else one per frame."""
    device = torch.device(device)
    cuda = device.type == "cuda"

    def up(array: np.ndarray) -> torch.Tensor:
        host = torch.from_numpy(np.ascontiguousarray(array))
        if not cuda:
            return host
        return host.pin_memory().to(device, non_blocking=True)

    if len({img.shape for img in images}) == 1:
        return list(up(np.stack(images)).unbind(0))
    return [up(img) for img in images]


def letterbox_tensor(images: Sequence[np.ndarray], size: int, stride: int = 32,
                     device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[Letterbox]]:
    """`letterbox_batch` on `device`: bilinear resize (half-pixel centres, as cv2.INTER_LINEAR),
    rounded to uint8 levels like OpenCV's output, grey (114) padding, RGB float [0, 1] NCHW."""
    from torch.nn import functional as F

    out_h, out_w = letterbox_shape(images, size, stride)
    frames = upload_frames(images, device)
    batch = torch.full((len(images), 3, out_h, out_w), 114.0, dtype=torch.float32, device=device)
    boxes: list[Letterbox] = []
    for i, (img, frame) in enumerate(zip(images, frames)):
        h, w = img.shape[:2]
        gain = min(out_h / h, out_w / w)
        new_w, new_h = max(1, round(w * gain)), max(1, round(h * gain))
        x = frame.permute(2, 0, 1).unsqueeze(0).float()
        if (new_w, new_h) != (w, h):
            x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False).round_().clamp_(0, 255)
        top, left = (out_h - new_h) // 2, (out_w - new_w) // 2
        batch[i, :, top:top + new_h, left:left + new_w] = x[0].flip(0)      # BGR -> RGB
        boxes.append(Letterbox(gain=(new_w / w + new_h / h) / 2, pad_x=left, pad_y=top))
    return batch.div_(255.0), boxes


def resize_normalise_tensor(images: Sequence[np.ndarray], size: int, device: torch.device | str = "cpu",
                            mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                            ) -> torch.Tensor:
    """`resize_normalise` on `device`: cv2.INTER_AREA's weights as two matrix products per
    frame, rounded to uint8 levels like OpenCV's output, then RGB, [0, 1], ImageNet
    normalisation, NCHW."""
    frames = upload_frames(images, device)
    out = []
    for frame in frames:
        x = frame.permute(2, 0, 1).float()                      # 3 x H x W, BGR
        h, w = x.shape[-2:]
        if (h, w) != (size, size):
            shrink = h >= size and w >= size
            wy = torch.from_numpy(_inter_area_weights(h, size, shrink)).to(x.device)
            wx = torch.from_numpy(_inter_area_weights(w, size, shrink)).to(x.device)
            x = (wy @ x @ wx.T).round_().clamp_(0, 255)
        out.append(x.flip(0))
    tensor = torch.stack(out).div_(255.0)
    m = torch.tensor(mean, device=tensor.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=tensor.device).view(1, 3, 1, 1)
    return tensor.sub_(m).div_(s)


@functools.lru_cache(maxsize=32)
def _inter_area_weights(n_in: int, n_out: int, shrink: bool) -> np.ndarray:
    """(n_out, n_in) weights of OpenCV's INTER_AREA along one axis: the overlap of each output
    pixel's source interval when both axes shrink, else its linear-like enlarging coefficients."""
    weights = np.zeros((n_out, n_in), np.float64)
    inv_scale = n_out / n_in
    scale = 1.0 / inv_scale        # as OpenCV computes it: floor() below depends on the last bit
    for d in range(n_out):
        if shrink:
            start, end = d * scale, (d + 1) * scale
            for s in range(int(math.floor(start)), min(n_in, int(math.ceil(end)))):
                weights[d, s] = (min(end, s + 1) - max(start, s)) / scale
        else:
            sx = int(math.floor(d * scale))
            fx = (d + 1) - (sx + 1) * inv_scale
            fx = 0.0 if fx <= 0 else fx - math.floor(fx)
            if sx >= n_in - 1:
                sx, fx = n_in - 1, 0.0
            weights[d, sx] += 1.0 - fx
            if fx:
                weights[d, sx + 1] += fx
    return weights.astype(np.float32)
