"""What a merge works on: the models (one per model key), the queries over them with their
accuracy targets, and frames from each camera split into training and held-out parts."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import cv2
import numpy as np

from ..config import Config, TaskConfig, model_key  # the daemon's key: bundles are looked up by it
from .. import models as zoo
from ..models.base import ZooModel
from ..recordings import playable
from ..redaction import redact

ModelBuilder = Callable[[str, Optional[str], bool, str], ZooModel]


@dataclass
class QuerySpec:
    query_id: str
    model_key: str
    camera: str
    task: TaskConfig
    target: float


@dataclass
class CameraFrames:
    train: list[np.ndarray]
    heldout: list[np.ndarray]


@dataclass
class Workload:
    models: dict[str, ZooModel]                   # model key -> model (its module gets merged in place)
    queries: list[QuerySpec]
    frames: dict[str, CameraFrames]               # camera id -> frames
    architectures: dict[str, str] = field(default_factory=dict)
    weights: dict[str, Optional[str]] = field(default_factory=dict)

    def queries_of(self, key: str) -> list[QuerySpec]:
        return [q for q in self.queries if q.model_key == key]

    def train_frames_of(self, key: str) -> list[np.ndarray]:
        cameras = dict.fromkeys(q.camera for q in self.queries_of(key))
        return [f for cam in cameras for f in self.frames[cam].train]

    @property
    def modules(self) -> dict[str, Any]:
        return {k: m.module for k, m in self.models.items()}


def read_camera_frames(source: str, count: int, long_side: Optional[int], heldout_fraction: float = 0.3
                       ) -> CameraFrames:
    """`count` frames spread evenly over the whole file; the last `heldout_fraction` of the clip's
    time is held out (neighbouring frames are near-copies, so an interleaved split would flatter)."""
    source = playable(source)
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise RuntimeError(f"cannot open camera source {redact(source)}")
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        wanted = set(np.linspace(0, max(total - 1, 0), num=count).round().astype(int).tolist()) if total else None
        frames: list[np.ndarray] = []
        index = 0
        while len(frames) < count:
            if wanted is not None and index not in wanted:
                ok = cap.grab()
            else:
                ok, image = cap.read()
                if ok:
                    frames.append(_resize_long_side(image, long_side))
            if not ok:
                break
            index += 1
    finally:
        cap.release()
    if len(frames) < 4:
        raise RuntimeError(f"camera source {source} gave only {len(frames)} frames")
    split = max(1, min(len(frames) - 1, round(len(frames) * (1 - heldout_fraction))))
    return CameraFrames(frames[:split], frames[split:])


def _resize_long_side(image: np.ndarray, long_side: Optional[int]) -> np.ndarray:
    if long_side is None or max(image.shape[:2]) <= long_side:
        return image
    h, w = image.shape[:2]
    gain = long_side / max(h, w)
    return cv2.resize(image, (max(8, round(w * gain)), max(8, round(h * gain))), interpolation=cv2.INTER_AREA)


def default_builder(name: str, weights: Optional[str], download: bool, device: str) -> ZooModel:
    return zoo.build_model(name, weights, download, device)


def workload_from_config(cfg: Config, *, frames_per_camera: int = 48, frame_long_side: Optional[int] = 160,
                         input_size: Optional[int] = None, device: str = "cpu",
                         builder: ModelBuilder = default_builder, read_frames: bool = True) -> Workload:
    """Build each distinct model of the config's model queries once; read frames per camera.

    `input_size` overrides every model's network input size (original and merged alike) so
    retraining fits a CPU; agreement is then measured at that size.
    """
    models: dict[str, ZooModel] = {}
    queries: list[QuerySpec] = []
    archs: dict[str, str] = {}
    weights: dict[str, Optional[str]] = {}
    for q in cfg.queries:
        if q.task.type == "passthrough" or not q.model:
            continue
        key = model_key(q)
        if key not in models:
            models[key] = builder(q.model, q.weights, q.download, device)
            if input_size is not None:
                models[key].input_size = input_size
            archs[key], weights[key] = q.model, q.weights
        queries.append(QuerySpec(q.id, key, q.camera, q.task, q.accuracy_target))
    frames: dict[str, CameraFrames] = {}
    if read_frames:
        for cam_id in dict.fromkeys(q.camera for q in queries):
            frames[cam_id] = read_camera_frames(cfg.camera(cam_id).source, frames_per_camera, frame_long_side)
    return Workload(models, queries, frames, archs, weights)
