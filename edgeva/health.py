"""Which queries lately drop nearly every frame with reason `error` (a model that fails on
every batch, a task that raises): health is false while one does."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Callable, Mapping

from edgeva.messages import DropReason
from edgeva.stats import QueryStats


class ErrorWatch:
    """Samples each query's (frames in, dropped with `error`) and compares over `window_s`."""

    def __init__(self, window_s: float = 30.0, min_frames: int = 20, fraction: float = 0.9,
                 sample_every_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self.min_frames = min_frames
        self.fraction = fraction
        self.sample_every_s = sample_every_s
        self._clock = clock
        self._samples: deque[tuple[float, dict[str, tuple[int, int]]]] = deque()
        self._lock = threading.Lock()

    def observe(self, queries: Mapping[str, QueryStats]) -> None:
        now = self._clock()
        sample = {q: (s.frames_in, s.dropped.get(DropReason.ERROR.value, 0)) for q, s in list(queries.items())}
        with self._lock:
            if self._samples and now - self._samples[-1][0] < self.sample_every_s:
                return
            self._samples.append((now, sample))
            while len(self._samples) > 2 and now - self._samples[1][0] >= self.window_s:
                self._samples.popleft()

    def failing(self) -> list[str]:
        """Queries with at least `min_frames` new frames in the window, `fraction` of them errors."""
        with self._lock:
            if len(self._samples) < 2:
                return []
            (_, old), (_, new) = self._samples[0], self._samples[-1]
        out = []
        for query, (frames, errors) in new.items():
            frames0, errors0 = old.get(query, (0, 0))
            if frames < frames0:   # counters restarted (the query was rebuilt)
                continue
            if frames - frames0 >= self.min_frames and errors - errors0 >= self.fraction * (frames - frames0):
                out.append(query)
        return sorted(out)
