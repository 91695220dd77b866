"""Audits: the model runs on a random share of the frames the filter skipped, and the agreement
of the reused result with what the model said is the filter's measured accuracy online.

The share is sized for statistical power rather than fixed: enough audits that a fall of the
query's overall agreement to `target - detect_drop` is detected within `detect_within_s`.
"""
from __future__ import annotations

import hashlib
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from .. import confidence

Z_ALPHA = 1.645   # one-sided 5 % false alarm
Z_POWER = 0.842   # 80 % power


def audit_draw(camera: str, seq: int) -> float:
    """A frame's audit draw, uniform in [0, 1): a query audits a frame it skipped when the draw
    is below its audit share. Every query of the camera gets the same draw for the frame, so
    their audits fall on the same frames (the model runs such a frame once) while each query's
    audits stay a random sample of what it skipped; and a replay audits the same frames in every
    process."""
    digest = hashlib.blake2b(f"{camera}\0{seq}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0 ** 64


def wilson_lower_bound(successes: int, n: int, z: float = 1.96) -> float:
    """Of a share of successes among n audits."""
    return confidence.wilson_lower_bound(successes / n if n > 0 else 0.0, n, z)


@dataclass
class AuditTracker:
    """Agreement of reused results with what the model would have said, from random audits.

    The query's accuracy target is a mean agreement, so the decisions use the mean of the last
    `window` audits with a normal-approximation confidence interval: `needs_retune` when even
    its upper end is below the target (confidently too lossy), `can_relax` when its lower end is
    above the target plus a margin. `wilson_low` (share of audits that agreed fully, at
    `agree_level`) is reported for operators.
    """

    window: int = 200
    # Ten audits already tell a 0.67 from a 0.9 with the interval below; waiting for thirty let
    # a short busy stretch pass unaudited.
    min_samples: int = 10
    agree_level: float = 0.999
    z: float = 1.96
    relax_margin: float = 0.02
    total: int = 0
    agreement_sum: float = 0.0
    recent: deque = field(default_factory=deque)
    _sum: float = 0.0       # of `recent`, kept as audits come and go: spread() runs on every skip
    _sum_sq: float = 0.0

    def record(self, agreement: float) -> None:
        value = float(agreement)
        self.total += 1
        self.agreement_sum += value
        self.recent.append(value)
        self._sum += value
        self._sum_sq += value * value
        while len(self.recent) > self.window:
            old = self.recent.popleft()
            self._sum -= old
            self._sum_sq -= old * old

    def reset_window(self) -> None:
        self.recent.clear()
        self._sum = self._sum_sq = 0.0

    def _mean_var(self) -> tuple[float, float]:
        n = len(self.recent)
        mean = self._sum / n
        var = max(0.0, (self._sum_sq - n * mean * mean) / max(1, n - 1))
        return mean, var

    @property
    def mean_agreement(self) -> Optional[float]:
        return self.agreement_sum / self.total if self.total else None

    def wilson_low(self) -> Optional[float]:
        if not self.recent:
            return None
        return wilson_lower_bound(sum(v >= self.agree_level for v in self.recent), len(self.recent), self.z)

    def interval(self, reused_share: float = 1.0) -> Optional[tuple[float, float]]:
        """(low, high) of the window's mean agreement; None below min_samples.

        With `reused_share` < 1 the interval is of the query's overall agreement: inferred
        frames agree fully, so overall = 1 - reused_share * (1 - mean audited agreement)."""
        n = len(self.recent)
        if n < self.min_samples:
            return None
        mean, var = self._mean_var()
        half = self.z * math.sqrt(var / n)
        low, high = mean - half, mean + half
        return 1 - reused_share * (1 - low), 1 - reused_share * (1 - high)

    def needs_retune(self, target: float, reused_share: float = 1.0) -> bool:
        bounds = self.interval(reused_share)
        return bounds is not None and bounds[1] < target

    def can_relax(self, target: float, reused_share: float = 1.0) -> bool:
        bounds = self.interval(reused_share)
        return bounds is not None and bounds[0] >= min(1.0, target + self.relax_margin)

    def spread(self, prior: float = 0.3) -> float:
        """Standard deviation of one audit's agreement (a prior until there are enough)."""
        if len(self.recent) < self.min_samples:
            return prior
        return max(0.05, math.sqrt(self._mean_var()[1]))


def audits_needed(spread: float, reused_share: float, detect_drop: float = 0.05) -> int:
    """Audits for a one-sided test to see the overall agreement fall by `detect_drop` (5 % false
    alarms, 80 % power). A drop of d overall is a drop of d / reused_share among reused frames."""
    if reused_share <= 0:
        return 0
    effect = detect_drop / reused_share
    return math.ceil(((Z_ALPHA + Z_POWER) * spread / effect) ** 2)


def audit_fraction_for_power(spread: float, reused_share: float, reused_fps: float,
                             detect_within_s: float = 180.0, detect_drop: float = 0.05,
                             lowest: float = 0.005, highest: float = 0.25) -> float:
    """The share of skipped frames to audit so that `audits_needed` arrive within `detect_within_s`."""
    if reused_fps <= 0:
        return highest
    wanted = audits_needed(spread, reused_share, detect_drop) / (detect_within_s * reused_fps)
    return min(highest, max(lowest, wanted))
