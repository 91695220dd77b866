"""Progress of a batch run (`edgeva run --until-end`): a periodic line and a closing summary."""
from __future__ import annotations

import time
from collections import deque
from typing import Any, Callable, Optional

RATE_WINDOW_S = 15.0


class BatchProgress:
    """Frames done over time, for the `frames, frames/s, ETA` line."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.started = clock()
        self._samples: deque[tuple[float, int]] = deque()

    def line(self, done: int, total: Optional[int], clips: Optional[tuple[int, int]] = None) -> str:
        now = self._clock()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW_S:
            self._samples.popleft()
        t0, d0 = self._samples[0]
        rate = (done - d0) / (now - t0) if now > t0 else 0.0
        if total is not None and done > total:   # a looping source, or a container's count that was short
            total = None
        parts = [f"{done}/{total} frames ({100.0 * done / total:.1f} %)" if total else f"{done} frames",
                 f"{rate:.1f} frames/s"]
        if total and rate > 0:
            parts.append(f"ETA {duration(max(0, total - done) / rate)}")
        if clips is not None and clips[1] > 1:
            parts.append(f"clip {clips[0]}/{clips[1]}")
        return ", ".join(parts)

    def summary(self, snapshot: dict[str, Any], frames: int) -> str:
        """What a batch run did, per query, from the final stats snapshot."""
        elapsed = self._clock() - self.started
        lines = [f"processed {frames} frames from {len(snapshot.get('cameras', {}))} cameras in {duration(elapsed)} "
                 f"({frames / elapsed if elapsed > 0 else 0.0:.1f} frames/s)"]
        widths = (18, 8, 9, 8, 10, 8)
        lines.append(_row(("query", "frames", "inferred", "reused", "offloaded", "dropped"), widths) + "  reasons")
        for name, q in snapshot.get("queries", {}).items():
            reasons = ", ".join(f"{k}={v}" for k, v in q.get("dropped", {}).items())
            lines.append(_row((name, q["frames_in"], q["inferred"], q["reused"], q["offloaded"], q["dropped_total"]),
                              widths) + (f"  {reasons}" if reasons else ""))
        for key, model in (snapshot.get("models") or {}).items():
            if isinstance(model, dict) and "frames" in model:   # what the model cost: a frame several queries kept ran once
                lines.append(f"model {key}: {model['frames']} images in {model.get('batches', 0)} batches")
        results = snapshot.get("results") or {}
        if results:
            lines.append(f"results: {results.get('emitted', 0)} records, {results.get('lost', 0)} lost")
        return "\n".join(lines)


def duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _row(cells: tuple[Any, ...], widths: tuple[int, ...]) -> str:
    return " ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths)).rstrip()
