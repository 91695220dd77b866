"""Query tasks: what a query reports per frame (`value`) and how close two reports are
(`agreement`, in [0, 1]). Accuracy throughout edgeva is the mean agreement of a query's
values with its reference: the original model run on every frame."""
from __future__ import annotations

import difflib
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Optional, Sequence

import numpy as np

from ..config import TaskConfig
from .base import ZooModel
from .coco import COCO_ALIASES
from .errors import TaskError
from .outputs import ClassProbs, Detections

IOU_MATCH = 0.5
OTHER_LABEL = "other"


class Task(ABC):
    type: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ("detector", "classifier")  # model kinds it works with

    def __init__(self, config: TaskConfig, class_names: Sequence[str], class_ids: list[int]) -> None:
        self.confidence = config.confidence
        self.class_names = list(class_names)
        self.class_ids = class_ids  # selected classes; empty: all

    @abstractmethod
    def value(self, output: Any) -> Any:
        """The JSON-able per-frame result (the model output, or the frame for passthrough)."""

    @staticmethod
    @abstractmethod
    def agreement(a: Any, b: Any) -> float:
        """1.0 when two values say the same thing, down to 0.0."""

    def _expect(self, output: Any, kind: type) -> None:
        if not isinstance(output, kind):
            raise TypeError(f"{self.type} task expects {kind.__name__}, got {type(output).__name__}")


class CountTask(Task):
    type = "count"
    needs = ("detector",)

    def value(self, output: Detections) -> dict[str, int]:
        self._expect(output, Detections)
        confident = output.class_ids[output.scores >= self.confidence]
        return {self.class_names[c]: int((confident == c).sum()) for c in self.class_ids}

    @staticmethod
    def agreement(a: dict[str, int], b: dict[str, int]) -> float:
        """Weighted Jaccard: sum_k min(a_k, b_k) / sum_k max(a_k, b_k); 1 when both are empty.

        For one class this is 1 - |a-b|/max(a,b). Classes absent from both results add nothing
        to either sum, so they cannot inflate the score (a per-class average gives 5 cars vs
        none, with classes car/bus/truck, 0.67 rather than 0), and a car read as a truck
        scores 0, not 1."""
        keys = set(a) | set(b)
        most = sum(max(a.get(k, 0), b.get(k, 0)) for k in keys)
        if most == 0:
            return 1.0
        return sum(min(a.get(k, 0), b.get(k, 0)) for k in keys) / most


class DetectTask(Task):
    type = "detect"
    needs = ("detector",)

    def value(self, output: Detections) -> list[list[Any]]:
        self._expect(output, Detections)
        keep = output.scores >= self.confidence
        if self.class_ids:
            keep &= np.isin(output.class_ids, self.class_ids)
        return [[*(round(float(v), 1) for v in box), round(float(score), 3), self.class_names[c]]
                for box, score, c in zip(output.boxes[keep], output.scores[keep], output.class_ids[keep])]

    @staticmethod
    def agreement(a: list[list[Any]], b: list[list[Any]]) -> float:
        """F1 of a greedy one-to-one matching (highest IoU first, same class, IoU >= 0.5)."""
        if not a and not b:
            return 1.0
        if not a or not b:
            return 0.0
        pairs = []
        for i, da in enumerate(a):
            for j, db in enumerate(b):
                if da[5] == db[5]:
                    iou = box_iou(da[:4], db[:4])
                    if iou >= IOU_MATCH:
                        pairs.append((iou, i, j))
        used_a: set[int] = set()
        used_b: set[int] = set()
        for _, i, j in sorted(pairs, reverse=True):
            if i not in used_a and j not in used_b:
                used_a.add(i)
                used_b.add(j)
        return 2 * len(used_a) / (len(a) + len(b))


class PresenceTask(Task):
    """Detectors: any confident object of the classes. Classifiers: top-1 is one of the
    classes, or their summed probability reaches the confidence."""

    type = "presence"

    def value(self, output: Detections | ClassProbs) -> bool:
        if isinstance(output, Detections):
            hit = np.isin(output.class_ids, self.class_ids) & (output.scores >= self.confidence)
            return bool(hit.any())
        self._expect(output, ClassProbs)
        return output.top1 in self.class_ids or float(output.probs[self.class_ids].sum()) >= self.confidence

    @staticmethod
    def agreement(a: bool, b: bool) -> float:
        return 1.0 if bool(a) == bool(b) else 0.0


class ClassifyTask(Task):
    """The top-1 label. With classes given, the label is the most probable of those classes
    or "other" (whose probability is everything else)."""

    type = "classify"
    needs = ("classifier",)

    def value(self, output: ClassProbs) -> dict[str, Any]:
        self._expect(output, ClassProbs)
        if not self.class_ids:
            return {"label": self.class_names[output.top1], "prob": round(output.top1_prob, 4)}
        selected = output.probs[self.class_ids]
        best = int(selected.argmax())
        other = max(0.0, 1.0 - float(selected.sum()))
        if other > selected[best]:
            return {"label": OTHER_LABEL, "prob": round(other, 4)}
        return {"label": self.class_names[self.class_ids[best]], "prob": round(float(selected[best]), 4)}

    @staticmethod
    def agreement(a: dict[str, Any] | str, b: dict[str, Any] | str) -> float:
        label_a = a["label"] if isinstance(a, dict) else a
        label_b = b["label"] if isinstance(b, dict) else b
        return 1.0 if label_a == label_b else 0.0


class PassthroughTask(Task):
    """No model: the frame's mean intensity (a liveness / scene-brightness signal)."""

    type = "passthrough"
    needs = ()

    def value(self, output: np.ndarray) -> dict[str, float]:
        self._expect(output, np.ndarray)
        return {"mean": round(float(output.mean()), 3)}

    @staticmethod
    def agreement(a: dict[str, float], b: dict[str, float]) -> float:
        return max(0.0, 1.0 - abs(a["mean"] - b["mean"]) / 255.0)


TASKS: dict[str, type[Task]] = {t.type: t for t in (CountTask, DetectTask, PresenceTask, ClassifyTask, PassthroughTask)}


MIN_DETECTOR_SCORE = 1e-3


def build_task(config: TaskConfig, model: Optional[ZooModel], query_id: str = "?") -> Task:
    """Check the task fits the model (kind, class names) and build it; TaskError names the query.

    A detector's `min_score` is lowered to the task's confidence when that is lower, so a
    model shared by several queries keeps every box the least demanding one needs.
    """
    task_cls = TASKS.get(config.type)
    if task_cls is None:
        raise TaskError(f"query {query_id!r}: unknown task type {config.type!r} (known: {', '.join(TASKS)})")
    if not task_cls.needs:
        return task_cls(config, [], [])
    if model is None:
        raise TaskError(f"query {query_id!r}: a {config.type} task needs a model")
    if model.kind not in task_cls.needs:
        raise TaskError(f"query {query_id!r}: a {config.type} task needs a {' or '.join(task_cls.needs)}; "
                        f"{model.name} is a {model.kind}")
    if config.type in ("count", "presence") and not config.classes:
        raise TaskError(f"query {query_id!r}: a {config.type} task needs at least one class")
    ids = [resolve_class(c, model.class_names, model.name, query_id) for c in config.classes]
    if model.kind == "detector" and config.confidence < getattr(model, "min_score", 0.0):
        model.min_score = max(config.confidence, MIN_DETECTOR_SCORE)
    return task_cls(config, model.class_names, list(dict.fromkeys(ids)))


def resolve_class(wanted: str | int, class_names: Sequence[str], model_name: str, query_id: str) -> int:
    """A class given by index or name (exact, case-insensitive, or a COCO alias) -> its index."""
    if isinstance(wanted, bool):
        raise TaskError(f"query {query_id!r}: class {wanted!r} is not a class name or index")
    if isinstance(wanted, int):
        if 0 <= wanted < len(class_names):
            return wanted
        raise TaskError(f"query {query_id!r}: class index {wanted} is out of range for {model_name} "
                        f"(0..{len(class_names) - 1})")
    if wanted in class_names:
        return class_names.index(wanted)
    lowered = [n.lower() for n in class_names]
    key = str(wanted).strip().lower()
    for candidate in (key, COCO_ALIASES.get(key, "")):
        if candidate in lowered:
            return lowered.index(candidate)
    close = difflib.get_close_matches(key, lowered, n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(repr(class_names[lowered.index(c)]) for c in close)}?)" if close else ""
    raise TaskError(f"query {query_id!r}: class {wanted!r} is not a class of {model_name}{hint}")


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0

