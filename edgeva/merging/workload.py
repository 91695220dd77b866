"""What a merge works on: the models (one per model key), the queries over them with their
accuracy targets, and frames from each camera split into training and held-out parts."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import cv2
import numpy as np

from ..config import Config, TaskConfig, model_key  # the daemon's key: bundles are looked up by it
from .. import models as zoo
from ..models.base import ZooModel
from ..models.preprocess import resize_long_side
from ..recordings import playable
from ..redaction import redact
from .probe import CANDIDATES_PER_FRAME, PROBE, make_candidates

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
    train_numbers: list[int] = field(default_factory=list)     # each frame's number in its source
    heldout_numbers: list[int] = field(default_factory=list)


@dataclass
class Workload:
    models: dict[str, ZooModel]                   # model key -> model (its module gets merged in place)
    queries: list[QuerySpec]
    frames: dict[str, CameraFrames]               # camera id -> frames
    architectures: dict[str, str] = field(default_factory=dict)
    weights: dict[str, Optional[str]] = field(default_factory=dict)
    digests: dict[str, Optional[str]] = field(default_factory=dict)   # sha256 of each weights file

    def queries_of(self, key: str) -> list[QuerySpec]:
        return [q for q in self.queries if q.model_key == key]

    @property
    def probes(self) -> list[str]:
        """Pseudo cameras every query is checked (and every model distilled) on besides its own."""
        return [c for c in self.frames if c == PROBE]

    def cameras_for(self, own: list[str], every_camera: bool) -> list[str]:
        """A model's own cameras first, then every other camera when asked, then the probes."""
        probes = self.probes
        rest = [c for c in self.frames if c not in own and (every_camera or c in probes)]
        return list(own) + rest

    @property
    def modules(self) -> dict[str, Any]:
        return {k: m.module for k, m in self.models.items()}


def read_camera_frames(source: str, count: int, long_side: Optional[int], heldout_fraction: float = 0.3,
                       min_heldout: int = 0) -> CameraFrames:
    """`count` frames spread evenly over the whole file (all of them when it has fewer); the last
    `heldout_fraction` of the clip's time, and at least `min_heldout` frames, is held out
    (neighbouring frames are near-copies, so an interleaved split would flatter)."""
    source = playable(source)
    cap = cv2.VideoCapture(source)
    if not cap.isOpened():
        raise RuntimeError(f"cannot open camera source {redact(source)}")
    try:
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        wanted = set(np.linspace(0, max(total - 1, 0), num=count).round().astype(int).tolist()) if total else None
        frames: list[np.ndarray] = []
        numbers: list[int] = []
        index = 0
        while len(frames) < count:
            if wanted is not None and index not in wanted:
                ok = cap.grab()
            else:
                ok, image = cap.read()
                if ok:
                    frames.append(resize_long_side(image, long_side))
                    numbers.append(index)
            if not ok:
                break
            index += 1
    finally:
        cap.release()
    if len(frames) < 4:
        raise RuntimeError(f"camera source {source} gave only {len(frames)} frames")
    heldout = max(round(len(frames) * heldout_fraction), min_heldout)
    split = max(1, min(len(frames) - 1, len(frames) - heldout))
    return CameraFrames(frames[:split], frames[split:], numbers[:split], numbers[split:])


def default_builder(name: str, weights: Optional[str], download: bool, device: str) -> ZooModel:
    return zoo.build_model(name, weights, download, device)


def file_digest(path: Optional[str]) -> Optional[str]:
    """sha256 of a weights file (None for no file, or an export directory)."""
    if not path:
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def workload_from_config(cfg: Config, *, frames_per_camera: int = 600, frame_long_side: Optional[int] = None,
                         min_heldout: int = 200, device: str = "cpu", builder: ModelBuilder = default_builder,
                         read_frames: bool = True, probe: int = 0) -> Workload:
    """Build each distinct model of the config's model queries once, at the query's configured
    input size (merged models are checked at the size the daemon will run them); read frames
    per camera at their native size unless `frame_long_side` shrinks them; with `probe`, add the
    candidates for that many probe frames per model, made from training frames and from held-out
    frames, as the pseudo camera PROBE (see `probe`)."""
    models: dict[str, ZooModel] = {}
    queries: list[QuerySpec] = []
    archs: dict[str, str] = {}
    weights: dict[str, Optional[str]] = {}
    digests: dict[str, Optional[str]] = {}
    for q in cfg.queries:
        if q.task.type == "passthrough" or not q.model:
            continue
        key = model_key(q)
        if key not in models:
            models[key] = builder(q.model, q.weights, q.download, device)
            if q.input_size is not None:
                models[key].input_size = q.input_size
            archs[key], weights[key], digests[key] = q.model, q.weights, file_digest(q.weights)
        queries.append(QuerySpec(q.id, key, q.camera, q.task, q.accuracy_target))
    frames: dict[str, CameraFrames] = {}
    if read_frames:
        for cam_id in dict.fromkeys(q.camera for q in queries):
            frames[cam_id] = read_camera_frames(cfg.camera(cam_id).source, frames_per_camera, frame_long_side,
                                                min_heldout=min_heldout)
        if probe > 0:
            made = probe * CANDIDATES_PER_FRAME
            frames[PROBE] = CameraFrames(make_candidates([f.train for f in frames.values()], made, seed=1),
                                         make_candidates([f.heldout for f in frames.values()], made, seed=2))
    return Workload(models, queries, frames, archs, weights, digests)
