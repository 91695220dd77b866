"""Probe frames: scenes the family's cameras do not show, made from their own frames.

A merged model can agree with its original wherever the original is sure and still flip the
frames of a new scene where it is not (on the eval car park the merged corridor classifier flipped
42 % of frames while agreeing at >= 0.985 on every tune/ camera). Probe candidates change the
scene the way a re-pointed or new camera does: a blend of two cameras' frames, a 2x2 mosaic of
four, a zoomed crop, a colour-shifted mirror image, a grey picture. Of the candidates, each
classifier is checked (and distilled) on those where its original is least sure, the region near
its decision boundary that its own cameras rarely reach; models whose outputs carry no margin
(detectors) get an even sample of the candidates. Distillation picks its probe frames the same
way from candidates made of training frames only; held-out candidates are made from held-out
frames only.
"""
from __future__ import annotations

from typing import Callable, Sequence

import cv2
import numpy as np

from ..models.base import ZooModel
from ..models.outputs import ClassProbs
from ..models.preprocess import resize_long_side

PROBE = "~probe"          # the probe's pseudo camera (no config camera id can start with "~")
CANDIDATES_PER_FRAME = 5  # candidates made per probe frame kept
LONG_SIDE = 640           # candidates are made at most this large (the largest input any model here uses)

Maker = Callable[[Callable[[], np.ndarray], np.random.Generator], np.ndarray]


def _blend(pick: Callable[[], np.ndarray], rng: np.random.Generator) -> np.ndarray:
    a, b = pick(), pick()
    weight = float(rng.uniform(0.3, 0.7))
    return cv2.addWeighted(a, weight, _fit(b, a.shape), 1.0 - weight, 0.0)


def _mosaic(pick: Callable[[], np.ndarray], rng: np.random.Generator) -> np.ndarray:
    out = pick().copy()
    h, w = out.shape[:2]
    for y0, y1 in ((0, h // 2), (h // 2, h)):
        for x0, x1 in ((0, w // 2), (w // 2, w)):
            out[y0:y1, x0:x1] = cv2.resize(pick(), (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    return out


def _zoom(pick: Callable[[], np.ndarray], rng: np.random.Generator) -> np.ndarray:
    a = pick()
    h, w = a.shape[:2]
    scale = float(rng.uniform(0.3, 0.6))
    ch, cw = max(8, int(h * scale)), max(8, int(w * scale))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return cv2.resize(a[y:y + ch, x:x + cw], (w, h), interpolation=cv2.INTER_LINEAR)


def _recolour(pick: Callable[[], np.ndarray], rng: np.random.Generator) -> np.ndarray:
    a = pick().astype(np.float32) * rng.uniform(0.5, 1.5, 3).astype(np.float32) + float(rng.uniform(-40, 40))
    return np.ascontiguousarray(np.clip(a, 0, 255).astype(np.uint8)[:, ::-1])


def _grey(pick: Callable[[], np.ndarray], rng: np.random.Generator) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(pick(), cv2.COLOR_BGR2GRAY), cv2.COLOR_GRAY2BGR)


MAKERS: tuple[Maker, ...] = (_blend, _mosaic, _zoom, _recolour, _grey)


def _fit(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if image.shape[:2] == shape[:2]:
        return image
    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def make_candidates(pools: Sequence[Sequence[np.ndarray]], count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` candidates, the makers taken in turn, from frames drawn across the pools (one pool
    per camera; a draw picks a camera, then a frame, so a long clip does not crowd out a short one)."""
    pools = [p for p in pools if len(p)]
    if not pools:
        return []
    rng = np.random.default_rng(seed)

    def pick() -> np.ndarray:
        pool = pools[int(rng.integers(len(pools)))]
        return resize_long_side(pool[int(rng.integers(len(pool)))], LONG_SIDE)

    return [MAKERS[i % len(MAKERS)](pick, rng) for i in range(count)]


def uncertainty(output: object) -> float:
    """How near the original's answer is to changing: 1 - (top-1 minus top-2 probability) for
    class probabilities; 0 for outputs without a margin (every candidate then ranks alike)."""
    if isinstance(output, ClassProbs) and output.probs.size > 1:
        top = np.sort(output.probs)[-2:]
        return float(1.0 - (top[1] - top[0]))
    return 0.0


def select_for(model: ZooModel, candidates: list[np.ndarray], count: int, batch: int = 16) -> list[np.ndarray]:
    """The `count` candidates on which the (still unmerged) model is least sure, in candidate
    order; an even spread over the candidates when its outputs carry no margin."""
    if len(candidates) <= count:
        return list(candidates)
    if model.kind != "classifier":
        return [candidates[i] for i in np.linspace(0, len(candidates) - 1, num=count).round().astype(int)]
    scores = np.array([uncertainty(o) for i in range(0, len(candidates), batch)
                       for o in model.predict(candidates[i:i + batch])])
    if not scores.any():
        chosen = np.linspace(0, len(candidates) - 1, num=count).round().astype(int)
    else:
        chosen = np.sort(np.argsort(-scores, kind="stable")[:count])
    return [candidates[i] for i in chosen]
