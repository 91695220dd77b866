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
from ..recordings import playable
from ..redaction import redact

ModelBuilder = Callable[[str, Optional[str], bool, str], ZooModel]
BLENDS = "~blends"      # the blend probe's pseudo camera (no config camera id can start with "~")


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
        return [c for c in self.frames if c == BLENDS]

    def cameras_for(self, own: list[str], every_camera: bool) -> list[str]:
        """A model's own cameras first, then every other camera when asked, then the probes."""
        rest = [c for c in self.frames if c not in own and (every_camera or c in self.probes)]
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
                    frames.append(_resize_long_side(image, long_side))
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


def blend_probe(frames: dict[str, CameraFrames], count: int, seed: int = 0) -> CameraFrames:
    """Frames from near the models' decision boundaries, which a family's own cameras rarely show:
    each is a blend (mixup) of two frames from different cameras (two frames of one camera when
    there is only one), weighted by w ~ U(0.3, 0.7). A merged model that agrees with its original
    only where the original is sure can still flip the frames of a new scene where it is not;
    these frames make that visible to the checks. Training blends mix training frames only and
    held-out blends held-out frames only, so the held-out split stays unseen."""
    rng = np.random.default_rng(seed)
    cameras = list(frames)

    def blends(part: str) -> list[np.ndarray]:
        pools = [getattr(frames[c], part) for c in cameras]
        out = []
        for _ in range(count if all(pools) else 0):
            i = int(rng.integers(len(pools)))
            j = (i + 1 + int(rng.integers(len(pools) - 1))) % len(pools) if len(pools) > 1 else i
            a = pools[i][int(rng.integers(len(pools[i])))]
            b = pools[j][int(rng.integers(len(pools[j])))]
            if b.shape != a.shape:
                b = cv2.resize(b, (a.shape[1], a.shape[0]), interpolation=cv2.INTER_AREA)
            weight = float(rng.uniform(0.3, 0.7))
            out.append(cv2.addWeighted(a, weight, b, 1.0 - weight, 0.0))
        return out

    return CameraFrames(blends("train"), blends("heldout"))


def _resize_long_side(image: np.ndarray, long_side: Optional[int]) -> np.ndarray:
    if long_side is None or max(image.shape[:2]) <= long_side:
        return image
    h, w = image.shape[:2]
    gain = long_side / max(h, w)
    return cv2.resize(image, (max(8, round(w * gain)), max(8, round(h * gain))), interpolation=cv2.INTER_AREA)


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
                         read_frames: bool = True, blends: int = 0) -> Workload:
    """Build each distinct model of the config's model queries once, at the query's configured
    input size (merged models are checked at the size the daemon will run them); read frames
    per camera at their native size unless `frame_long_side` shrinks them; with `blends`, add
    that many training and held-out blend-probe frames as the pseudo camera BLENDS."""
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
        if blends > 0:
            frames[BLENDS] = blend_probe(frames, blends)
    return Workload(models, queries, frames, archs, weights, digests)
