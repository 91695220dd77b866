"""Reduced precision per model, chosen at load by measuring it: run a few calibration frames
in float32 and under autocast (float16 on CUDA, or bfloat16), compare the outputs the way the
tasks compare results (detections: box F1 at IoU 0.5; classifiers: top-1), and keep the
reduced precision only when the agreement reaches the threshold. The same runs warm the
model up (cuDNN autotuning, lazy CUDA initialisation) before the daemon reports READY."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .base import ZooModel
from .outputs import ClassProbs, Detections, Output

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
Runner = Callable[[Callable[[], Any]], Any]


@dataclass(frozen=True)
class PrecisionChoice:
    requested: str
    chosen: str                       # fp32 | fp16 | bf16
    agreement: Optional[float]        # reduced vs float32 on the calibration frames
    frames: int
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_frames(count: int = 4, shape: tuple[int, int] = (480, 640), seed: int = 0) -> list[np.ndarray]:
    """Deterministic street-like frames (smooth background, solid rectangles): enough structure
    for a network to respond to, no files needed."""
    rng = np.random.default_rng(seed)
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    frames = []
    for _ in range(count):
        base = (rng.uniform(40, 200, 3)[None, None, :] + 40 * np.sin(xx / rng.uniform(30, 120))[..., None]
                + 30 * np.cos(yy / rng.uniform(30, 120))[..., None])
        img = base.clip(0, 255).astype(np.uint8)
        for _ in range(rng.integers(3, 8)):
            x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
            x1, y1 = x0 + int(rng.integers(20, w // 3)), y0 + int(rng.integers(20, h // 3))
            img[y0:y1, x0:x1] = rng.integers(0, 255, 3)
        frames.append(img)
    return frames


def output_agreement(reference: Sequence[Output], other: Sequence[Output]) -> float:
    """Mean per-frame agreement: detections box F1 (IoU >= 0.5, same class), classes top-1."""
    from .tasks import DetectTask

    scores = []
    for a, b in zip(reference, other):
        if isinstance(a, Detections) and isinstance(b, Detections):
            def rows(d: Detections) -> list[list[Any]]:
                return [[*box.tolist(), float(s), int(c)] for box, s, c in zip(d.boxes, d.scores, d.class_ids)]
            scores.append(DetectTask.agreement(rows(a), rows(b)))
        elif isinstance(a, ClassProbs) and isinstance(b, ClassProbs):
            scores.append(float(a.top1 == b.top1))
        else:
            raise TypeError(f"cannot compare {type(a).__name__} with {type(b).__name__}")
    return float(np.mean(scores)) if scores else 1.0


def choose_precision(model: ZooModel, requested: str = "auto", min_agreement: float = 0.98,
                     frames: Optional[Sequence[np.ndarray]] = None,
                     run: Runner = lambda fn: fn()) -> PrecisionChoice:
    """Set `model.autocast_dtype` to the reduced precision if it agrees with float32, and
    record the outcome in `model.precision`. `run` wraps each prediction (a memory manager's
    run under a budget). `auto` means fp16 on CUDA, fp32 elsewhere."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    device = getattr(model, "device", None)
    on_cuda = getattr(device, "type", None) == "cuda"
    if not getattr(model, "is_torch", False):
        choice = PrecisionChoice(requested, "fp32", None, 0, "not a torch model: runs as exported")
    elif requested == "fp32" or (requested == "auto" and not on_cuda):
        model.autocast_dtype = None
        if on_cuda:
            frames = list(frames) if frames is not None else calibration_frames()
            run(lambda: model.predict(frames))        # warm-up only
        choice = PrecisionChoice(requested, "fp32", None, 0,
                                 "requested" if requested == "fp32" else "no CUDA device: float32")
    else:
        model.autocast_dtype = None
        frames = list(frames) if frames is not None else calibration_frames()
        wanted = "fp16" if requested == "auto" else requested
        reference = run(lambda: model.predict(frames))
        model.autocast_dtype = _DTYPES[wanted]
        try:
            reduced = run(lambda: model.predict(frames))
            agreement = output_agreement(reference, reduced)
        except Exception as exc:    # an op without a kernel for this dtype on this device
            model.autocast_dtype = None
            choice = PrecisionChoice(requested, "fp32", None, len(frames), f"{wanted} failed: {exc}")
        else:
            if agreement >= min_agreement:
                choice = PrecisionChoice(requested, wanted, round(agreement, 4), len(frames),
                                         f"agreement with float32 {agreement:.3f} >= {min_agreement:g}")
            else:
                model.autocast_dtype = None
                choice = PrecisionChoice(requested, "fp32", round(agreement, 4), len(frames),
                                         f"{wanted} agreement with float32 {agreement:.3f} < {min_agreement:g}: "
                                         f"stays float32")
    model.precision = choice
    log.info("model %s: %s (%s)", getattr(model, "name", "?"), choice.chosen, choice.reason)
    return choice
