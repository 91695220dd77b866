"""Whether a failing merge trial is worth retraining, judged from what retraining has paid so far.

A failing trial can be retrained (minutes for a detector on a CPU) or given up at once so the
next candidate is tried (one agreement check). Retraining is worth its time only while its
expected yield, bytes per second, is at least what plain trials have been yielding:

    P(rescue) * bytes at stake / expected retraining seconds  >=  bytes accepted / seconds, untrained trials

P(rescue) is Laplace's rule over this architecture's retrainings so far ((rescues + 1) /
(retrainings + 2)), so an architecture is always retrained at first and stops being retrained
only after it has failed to pay; the seconds are its retrainings' mean so far. Nothing here is
tuned per workload: it is bookkeeping of the run's own trials.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RetrainRecord:
    retrainings: int = 0
    rescues: int = 0
    seconds: float = 0.0

    @property
    def rescue_chance(self) -> float:
        return (self.rescues + 1) / (self.retrainings + 2)

    @property
    def mean_seconds(self) -> float:
        return self.seconds / self.retrainings if self.retrainings else 0.0


@dataclass
class RetrainBudget:
    by_architecture: dict[str, RetrainRecord] = field(default_factory=dict)
    plain_seconds: float = 0.0          # trial time outside retraining
    plain_bytes: int = 0                # bytes accepted without retraining

    def record(self, architectures: list[str], retrain_seconds: float, rescued: bool, trial_seconds: float,
               bytes_accepted_untrained: int) -> None:
        """One trial: its retraining (if any) counts for each architecture it retrained."""
        self.plain_seconds += max(0.0, trial_seconds - retrain_seconds)
        self.plain_bytes += bytes_accepted_untrained
        if retrain_seconds <= 0:
            return
        for arch in dict.fromkeys(architectures):
            rec = self.by_architecture.setdefault(arch, RetrainRecord())
            rec.retrainings += 1
            rec.rescues += int(rescued)
            rec.seconds += retrain_seconds

    def expected_yield(self, architectures: list[str], bytes_at_stake: int) -> float:
        """Bytes per second retraining is expected to yield on a trial of these architectures
        (the least promising architecture decides: every model in the trial must be rescued)."""
        records = [self.by_architecture.get(a, RetrainRecord()) for a in dict.fromkeys(architectures)]
        timed = [r.mean_seconds for r in records if r.retrainings]
        if not timed:
            return float("inf")          # nothing known yet: retrain, and learn what it costs
        return min(r.rescue_chance for r in records) * bytes_at_stake / max(max(timed), 1e-6)

    def has_rescued(self, architectures: list[str]) -> bool:
        """Retraining has turned a failing trial of every one of these architectures into an
        accepted one in this run."""
        return all(self.by_architecture.get(a, RetrainRecord()).rescues > 0 for a in dict.fromkeys(architectures))

    def plain_yield(self) -> float:
        return self.plain_bytes / self.plain_seconds if self.plain_seconds > 0 else 0.0

    def worth_retraining(self, architectures: list[str], bytes_at_stake: int) -> bool:
        return self.expected_yield(architectures, bytes_at_stake) >= self.plain_yield()

    def reason_to_skip(self, architectures: list[str], bytes_at_stake: int) -> str:
        return (f"not retrained: expected {self.expected_yield(architectures, bytes_at_stake) / 2**20:.3f} MiB/s "
                f"< {self.plain_yield() / 2**20:.3f} MiB/s of untrained trials")
