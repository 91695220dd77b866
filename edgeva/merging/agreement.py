"""How far a merge step's models still agree with their originals: each query's values on the
held-out frames of the cameras it is checked on, compared with the originals' values from before
the merge, judged by the worst camera's mean or Wilson lower bound against the query's target."""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from ..confidence import wilson_lower_bound
from ..models.tasks import Task, build_task
from .runner import ModelRunner
from .workload import QuerySpec, Workload

class AgreementCheck:
    def __init__(self, workload: Workload, runners: dict[str, ModelRunner], check_on: str, accept_on: str) -> None:
        self.workload = workload
        self.runners = runners
        self.check_on = check_on            # own camera | all cameras
        self.accept_on = accept_on          # mean | lower-bound
        self.tasks: dict[str, Task] = {q.query_id: build_task(q.task, workload.models[q.model_key], q.query_id)
                                       for q in workload.queries}
        self.targets = {q.query_id: q.target for q in workload.queries}
        self._queries = {q.query_id: q for q in workload.queries}
        started = time.monotonic()
        self.references = {q.query_id: self.values(q.query_id) for q in workload.queries}
        self.reference_seconds = time.monotonic() - started

    def query(self, query_id: str) -> QuerySpec:
        return self._queries[query_id]

    def checked_cameras(self, query_id: str) -> list[str]:
        """Whose held-out frames a query's agreement is measured on: its own camera's, or with
        check_on "all" every camera's (a merged model must also agree with its original on the
        scenes it was not specialised for, as it meets when a camera is re-pointed or moved), and the
        probe frames (`probe`) whenever the workload has them."""
        return self.workload.cameras_for([self.query(query_id).camera], self.check_on == "all")

    def values(self, query_id: str, start: int = 0) -> list[list[Any]]:
        """The query's values on each checked camera's held-out frames."""
        return [self.camera_values(query_id, cam, start) for cam in self.checked_cameras(query_id)]

    def camera_values(self, query_id: str, camera: str, start: int) -> list[Any]:
        task = self.tasks[query_id]
        return [task.value(o) for o in self.runners[self.query(query_id).model_key].outputs(camera, start)]

    def camera_agreement(self, query_id: str, mine: list[Any], theirs: list[Any]) -> float:
        task = self.tasks[query_id]
        return float(np.mean([task.agreement(a, b) for a, b in zip(mine, theirs)]))

    def agreement(self, query_id: str, values: list[list[Any]]) -> float:
        """Agreement with the original on the worst checked camera: pooling cameras would let
        frames easy to agree on elsewhere hide a fall on one camera."""
        return min(self.camera_agreement(query_id, mine, theirs)
                   for mine, theirs in zip(values, self.references[query_id]))

    def judged_frames(self, query_id: str) -> int:
        """Frames behind a query's agreement figure (its camera with the fewest held-out frames)."""
        return min(len(r) for r in self.references[query_id])

    def judged(self, query_id: str, agreement: float) -> float:
        """The figure a target is compared with: the mean, or its lower bound (accept_on)."""
        if self.accept_on == "lower-bound":
            return wilson_lower_bound(agreement, self.judged_frames(query_id))
        return agreement

    def target_met(self, query_id: str, agreement: float) -> bool:
        return self.judged(query_id, agreement) >= self.targets[query_id]

    def all_met(self, agreement: dict[str, float]) -> bool:
        return all(self.target_met(q, a) for q, a in agreement.items())

    def worst_gap(self, agreement: dict[str, float]) -> float:
        return max((self.targets[q] - self.judged(q, a) for q, a in agreement.items()), default=0.0)

    def lower_bounds(self, agreement: dict[str, float]) -> dict[str, float]:
        return {q: wilson_lower_bound(a, self.judged_frames(q)) for q, a in agreement.items()}

    def of_models(self, starts: dict[str, int]) -> dict[str, float]:
        """Agreement with the originals of the queries of the models in `starts`, each model run
        from its given block on (the blocks before it are unchanged)."""
        return {q.query_id: self.agreement(q.query_id, self.values(q.query_id, starts[q.model_key]))
                for q in self.workload.queries if q.model_key in starts}

    def until_failure(self, starts: dict[str, int], slack: Callable[[str], float]) -> dict[str, float]:
        """As `of_models`, but the queries with least `slack` first, and camera by camera,
        stopping at the first that misses its target (the queries after it are left out)."""
        out: dict[str, float] = {}
        for q in sorted((q for q in self.workload.queries if q.model_key in starts), key=lambda q: slack(q.query_id)):
            worst = 1.0
            for cam, reference in zip(self.checked_cameras(q.query_id), self.references[q.query_id]):
                values = self.camera_values(q.query_id, cam, starts[q.model_key])
                worst = min(worst, self.camera_agreement(q.query_id, values, reference))
                if not self.target_met(q.query_id, worst):
                    out[q.query_id] = worst
                    return out
            out[q.query_id] = worst
        return out

    def through_predict(self) -> dict[str, float]:
        """The final check, through each model's own `predict` on the held-out frames (the path
        the daemon runs), not the cached block chain."""
        out = {}
        for q in self.workload.queries:
            runner, task = self.runners[q.model_key], self.tasks[q.query_id]
            values = [[task.value(o) for o in runner.predicted(cam)] for cam in self.checked_cameras(q.query_id)]
            out[q.query_id] = self.agreement(q.query_id, values)
        return out
