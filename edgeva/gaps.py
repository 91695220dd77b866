"""Looking ahead: the skipped frames between two kept frames of a query, held until both
results are in, then answered from both sides (edgeva.filtering.tuner.bisect_sources).

A query that looks ahead (`filter.look_ahead`, batch replay) does not answer a skipped frame
with the last inferred result at once. The frame waits in the *gap* after that kept frame; when
the next kept frame closes the gap and both ends have results, the gap is planned here: ends that
agree answer every frame between with the left end's result; ends that disagree infer the frame
midway, which splits the gap in two, each planned again when its new end has a result. A change
that lasts is so located to the frame for about log2(gap) inferences, where reuse would carry
the old answer over half the gap on average. The plan is pure; `edgeva.query.ModelQuery` applies
it (emits, or submits the middle frame).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Optional, TypeVar

from edgeva.messages import Frame

End = TypeVar("End")      # a kept frame's inference (edgeva.query): what a gap's ends are


@dataclass
class Gap(Generic[End]):
    left: End
    frames: list[Frame] = field(default_factory=list)     # held, in frame order
    right: Optional[End] = None                           # the kept frame that closed it


@dataclass(frozen=True)
class AnswerFromLeft:
    """Every held frame takes the left end's result (the ends agree)."""


@dataclass(frozen=True)
class InferMiddle:
    """The ends disagree: infer `frame`; the gap becomes `before` (left .. frame) and `after`."""
    frame: Frame
    before: list[Frame]
    after: list[Frame]


def plan_gap(gap: Gap, left_seq: int, right_seq: int, left_value: Any, right_value: Any,
             agreement: Callable[[Any, Any], float]) -> AnswerFromLeft | InferMiddle:
    """What to do with a closed gap whose two ends (frames `left_seq` and `right_seq`) have
    results: the frame held nearest midway between them is the one to infer."""
    if not gap.frames or agreement(left_value, right_value) >= 1.0:
        return AnswerFromLeft()
    middle_seq = (left_seq + right_seq) // 2
    k = min(range(len(gap.frames)), key=lambda i: abs(gap.frames[i].seq - middle_seq))
    return InferMiddle(gap.frames[k], gap.frames[:k], gap.frames[k + 1:])
