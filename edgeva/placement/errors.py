"""Errors the planner raises."""
from __future__ import annotations

from .evaluate import Violation


class InfeasiblePlanError(ValueError):
    """No assignment satisfies every capacity; ``violations`` are the overloads of the
    least-overloaded assignment (minimum total relative overflow), i.e. what to add."""

    def __init__(self, violations: list[Violation], detail: str = ""):
        self.violations = violations
        names = "; ".join(v.describe() for v in violations) or detail or "unknown resource"
        suffix = ""
        if violations:
            suffix = " (overloads of the least-overloaded plan" + (f"; {detail})" if detail else ")")
        super().__init__(f"no feasible placement: {names}{suffix}")
